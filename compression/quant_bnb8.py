"""bitsandbytes LLM.int8: `Linear8bitLt` (outlier threshold 6.0) in place of every `nn.Linear` but the classifier.

Runs on GPU or CPU. Saved as safetensors of per-row int8 codes and their absmax (`compression.int8`, LLM.int8's
own weight format), so loading needs no pickle and quantizing the dequantized weights gives the same codes back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from compression.int8 import dequantize_rows
from compression.models import check_float_model, linear_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bnb8Config:
    """bitsandbytes LLM.int8."""

    threshold: float = 6.0  # activation outliers above this stay in fp16 (LLM.int8's mixed decomposition)
    skip: tuple[str, ...] = ("classifier",)  # module name prefixes kept in full precision

    def __post_init__(self):
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# --- quantizing, and the state that saves it -----------------------------------------------------------

_CAST_WARNING = "MatMul8bitLt: inputs will be cast from"


def _drop_cast_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_CAST_WARNING)


def _quiet_cast_warning() -> None:
    """Drop bnb's warning, on every forward, that fp32 inputs are cast to fp16 (expected for LLM.int8, not news).

    Only that message: the logger's other warnings still reach the user's handlers.
    """
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _drop_cast_warning not in logger.filters:
        logger.addFilter(_drop_cast_warning)


def quantize_bnb8_(model: nn.Module, config: Bnb8Config = Bnb8Config()) -> nn.Module:
    """Replace each quantizable nn.Linear by bitsandbytes' Linear8bitLt, in place, on the model's device."""
    check_float_model(model, "bnb8 quantization")  # Linear8bitLt is an nn.Linear: its codes would be requantized
    import bitsandbytes as bnb  # imported lazily: it probes for CUDA and logs at import

    _quiet_cast_warning()
    for name, linear in linear_layers(model, config.skip):
        device = linear.weight.device
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            has_fp16_weights=False, threshold=config.threshold,
        )
        q.weight = bnb.nn.Int8Params(linear.weight.data.float().cpu(), requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        _set_module(model, name, q.to(device))  # .to() is what quantizes the weight to int8
    model.quantization = ("bnb8", config)
    return model.eval()


def bnb8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State for safetensors: int8 codes + absmax for quantized linears, everything else as it is."""
    import bitsandbytes as bnb

    state = {}
    quantized = set()
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            state[f"{name}.weight"] = m.weight.data.to(torch.int8).cpu().contiguous()
            # SCB moves from the weight to the layer's state on the first forward
            absmax = m.weight.SCB if getattr(m.weight, "SCB", None) is not None else m.state.SCB
            state[f"{name}.weight_absmax"] = absmax.float().cpu().contiguous()
            quantized.add(f"{name}.weight")
    for key, value in model.state_dict().items():
        if key in quantized or key.endswith((".SCB", ".weight_format")) or key in state:
            continue
        state[key] = value.detach().cpu().contiguous()
    return state


def bnb8_from_state(
    skeleton: nn.Module, state: dict[str, torch.Tensor], config: Bnb8Config, device: str = "cpu"
) -> nn.Module:
    """`skeleton` (an fp32 model of the saved shape) with `bnb8_state`'s weights, quantized again on `device`.

    The dequantized weights re-quantize to the same codes, so the loaded model is the saved one.
    """
    state = dict(state)
    for key in [k for k in state if k.endswith(".weight_absmax")]:
        weight_key = key.removesuffix("_absmax")
        state[weight_key] = dequantize_rows(state[weight_key], state.pop(key))
    skeleton.load_state_dict(state, strict=True)
    return quantize_bnb8_(skeleton.to(device).eval(), config)  # bnb quantizes when a weight reaches its device


