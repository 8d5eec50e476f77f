"""Int8 weight-only linears: a second 8-bit path, built for GPU batch-1 latency (issue 13).

LLM.int8 (`compression.quant_bnb8`) splits every matmul into an int8 part and an fp16 outlier part at run time,
which costs several kernels and host-side work per linear and cannot be captured in a CUDA graph. Here each
`nn.Linear` but the classifier keeps its weight as per-row int8 codes and absmax (`compression.int8`, the same
codes LLM.int8 stores) and multiplies in the activations' precision:

- `kernel="int8pack"`: `torch._weight_int8pack_mm(x, codes, scale)`, one fused kernel (x @ codesᵀ * scale) where
  PyTorch has one for the device and dtype;
- `kernel="dequant"`: `F.linear(x, codes.to(x.dtype)) * scale`, plain ops available everywhere;
- `kernel="auto"`: "dequant" on a CPU (measured faster there); elsewhere "int8pack" where a probe on the layer's
  device and dtype succeeds, else "dequant" (`auto_kernel`).

Both are plain tensor ops, so a forward can be replayed from a CUDA graph (`compression.graphs`). Weights take a
quarter of fp32's memory; activations stay in floating point (no activation quantization error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from compression.int8 import QMAX, quantize_rows
from compression.models import check_float_model, linear_layers

log = logging.getLogger(__name__)

KERNELS = ("auto", "int8pack", "dequant")


@dataclass(frozen=True)
class Wo8Config:
    """Int8 weight-only quantization."""

    kernel: str = "auto"  # "int8pack" (one fused kernel), "dequant" (cast + matmul), "auto" (`auto_kernel`)
    skip: tuple[str, ...] = ("classifier",)  # module name prefixes kept in full precision

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")


@lru_cache(maxsize=None)
def int8pack_works(device: str, dtype: torch.dtype) -> bool:
    """Whether `torch._weight_int8pack_mm` runs (and agrees with plain ops) on this device type and dtype."""
    try:
        x = torch.ones(2, 32, device=device, dtype=dtype)
        codes = torch.ones(8, 32, device=device, dtype=torch.int8)
        out = torch._weight_int8pack_mm(x, codes, torch.full((8,), 0.5, device=device, dtype=dtype))
        return bool(torch.allclose(out.float().cpu(), torch.full((2, 8), 16.0)))
    except (RuntimeError, NotImplementedError, AttributeError) as error:
        log.info("torch._weight_int8pack_mm unavailable on %s %s: %s", device, dtype, error)
        return False


def auto_kernel(device: str, dtype: torch.dtype) -> str:
    """The kernel "auto" runs on a device type: plain ops on a CPU, the fused kernel elsewhere where it works.

    On this project's CPU (AMD EPYC, torch 2.13) the fused kernel was 5x slower at batch 1 and 30x at batch 32
    than a cast plus oneDNN's matmul (`benchmarks.gpu_graphs` dry run, smoke teacher: 117.6 against 22.6 ms;
    7 against 229 sentences/s). On a GPU it is not yet measured: the same benchmark times both kernels there.
    """
    return "int8pack" if device != "cpu" and int8pack_works(device, dtype) else "dequant"


def int8_matmul(
    x: torch.Tensor,  # [..., K], floating point
    codes: torch.Tensor,  # [N, K] int8
    scale: torch.Tensor,  # [N] float: absmax / 127
    kernel: str = "auto",
) -> torch.Tensor:
    """x @ (codes * scale[:, None])ᵀ -> [..., N] in x's dtype, without materialising the float weight where a
    fused kernel exists."""
    if kernel == "auto":
        kernel = auto_kernel(x.device.type, x.dtype)
    scale = scale.to(x.dtype)
    if kernel == "int8pack":
        flat = x.reshape(-1, x.shape[-1])
        return torch._weight_int8pack_mm(flat.contiguous(), codes, scale).view(*x.shape[:-1], codes.shape[0])
    return F.linear(x, codes.to(x.dtype)) * scale


class Int8WeightOnlyLinear(nn.Module):
    """An `nn.Linear` whose weight is int8 codes [out, in] with a per-row scale [out]; the bias stays float."""

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.kernel = kernel
        # parameters (frozen), so a quantized model counts as many parameters as its fp32 original
        self.codes = nn.Parameter(codes.to(torch.int8), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("scale", absmax.float() / QMAX)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto") -> Int8WeightOnlyLinear:
        codes, absmax = quantize_rows(linear.weight)
        return cls(codes, absmax, linear.bias, kernel).to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        out = int8_matmul(x, self.codes, self.scale, self.kernel)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def quantize_wo8_(model: nn.Module, config: Wo8Config = Wo8Config()) -> nn.Module:
    """Replace each quantizable `nn.Linear` (all but `config.skip`) by an `Int8WeightOnlyLinear`, in place."""
    check_float_model(model, "wo8 quantization")
    for name, linear in linear_layers(model, config.skip):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                Int8WeightOnlyLinear.from_linear(linear, config.kernel))
    model.quantization = ("wo8", config)
    return model.eval()
