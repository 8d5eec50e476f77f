"""Int8 primitives: per-row symmetric (absmax) quantization, as pure functions on tensors.

This is LLM.int8's weight format (bitsandbytes stores `CB` = these codes and `SCB` = the row absmax), so the
bnb8 artifacts are saved and restored through it: dequantize(quantize(w)) quantizes back to the same codes.
"""

from __future__ import annotations

import torch

QMAX = 127  # symmetric: -128 is never used, so negation is exact


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (finite) -> (codes int8 [out, in] in [-127, 127], absmax float32 [out]).

    Row r is scaled by absmax[r] / 127; an all-zero row gets absmax 0 and codes 0.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    codes = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, absmax


def dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """(codes int8 [out, in], absmax [out]) -> float32 [out, in], the inverse of `quantize_rows` up to rounding."""
    return codes.float() * (absmax.float() / QMAX)[:, None]


def step(absmax: torch.Tensor) -> torch.Tensor:
    """The quantization step of each row [out]: a round trip is off by at most half of it."""
    return absmax.float() / QMAX


def snr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-noise ratio of `approximation` against `reference`, in decibels."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approximation.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
