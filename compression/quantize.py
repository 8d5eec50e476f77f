"""8-bit quantization, one verb: `quantize(model, config)` returns the quantized model.

- `Int8Config`: ONNX Runtime dynamic int8 (`compression.quant_onnx`), the fastest 8-bit path on CPU; the result
  is a new model and `model` is left unchanged.
- `Bnb8Config`: bitsandbytes LLM.int8 (`compression.quant_bnb8`), on GPU or CPU; works in place on `model`
  (`quantize_bnb8_` is the in-place verb) and returns it.
- `Wo8Config`: int8 weight-only linears (`compression.quant_wo8`), the 8-bit path made for GPU batch-1 latency;
  works in place on `model` (`quantize_wo8_`) and returns it.

Every result is called as ``model(**batch).logits`` and records ``model.quantization = (kind, config)``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from compression.quant_bnb8 import Bnb8Config, quantize_bnb8_
from compression.quant_onnx import Int8Config, quantize_int8
from compression.quant_wo8 import Int8WeightOnlyLinear, Wo8Config, auto_kernel, quantize_wo8_

__all__ = ["Bnb8Config", "Int8Config", "Wo8Config", "backend_name", "quantize", "quantize_bnb8_", "quantize_int8",
           "quantize_wo8_"]


def quantize(model: PreTrainedModel, config: Bnb8Config | Int8Config | Wo8Config) -> nn.Module:
    """The quantized model for `config` (bnb8, wo8: `model` itself, quantized in place; int8: a new ONNX model)."""
    if isinstance(config, Bnb8Config):
        return quantize_bnb8_(model, config)
    if isinstance(config, Wo8Config):
        return quantize_wo8_(model, config)
    if isinstance(config, Int8Config):
        return quantize_int8(model, config)
    raise ValueError(f"unknown quantization config {config!r}")


def backend_name(model: nn.Module) -> str:
    """How a model runs, for the results table."""
    kind = getattr(model, "quantization", (None,))[0]
    if kind == "int8":
        return "onnxruntime-int8"
    device = next(iter(model.parameters())).device.type
    if kind == "wo8":  # with the kernel it runs on this device ("auto" resolved), as the two differ in speed
        kernels = {auto_kernel(device, torch.float32) if m.kernel == "auto" else m.kernel
                   for m in model.modules() if isinstance(m, Int8WeightOnlyLinear)}
        return f"int8-weight-only {'+'.join(sorted(kernels))} ({device})"
    return f"bnb-llm.int8 ({device})" if kind == "bnb8" else f"pytorch-fp32 ({device})"
