"""8-bit quantization of a classifier, two ways, with save and load for each.

- `bnb8`: bitsandbytes LLM.int8 (`Linear8bitLt`, outlier threshold 6.0) in place of every `nn.Linear` but the
  classifier, on GPU or CPU. Saved as safetensors: per-row int8 codes and their absmax (`compression.int8`).
- `int8`: the fastest 8-bit path on CPU, chosen by measurement (benchmarks/int8_backends.py): the model exported
  to ONNX and quantized by ONNX Runtime's dynamic quantization (int8 weights per output channel, activations
  quantized per call, VNNI kernels), embeddings as per-row int8 codes. The saved artifact is the `.onnx` file.

`quantize(model, config)` returns the quantized model; `quantize_bnb8_` works in place like torchao's
`quantize_`. Every result is called as ``model(**batch).logits``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from compression.int8 import dequantize_rows, quantize_rows
from compression.models import empty_classifier, load_classifier

log = logging.getLogger(__name__)

QUANT_FILE = "quantization.json"
ONNX_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
EMBEDDING_MODES = ("per-row", "per-tensor", "fp32")


@dataclass(frozen=True)
class Bnb8Config:
    """bitsandbytes LLM.int8."""

    threshold: float = 6.0  # activation outliers above this stay in fp16 (LLM.int8's mixed decomposition)
    skip: tuple[str, ...] = ("classifier",)  # module name prefixes kept in full precision

    def __post_init__(self):
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")


@dataclass(frozen=True)
class Int8Config:
    """ONNX Runtime dynamic int8, the default CPU path."""

    # Embedding tables are about half the default base's parameters. "per-row": int8 codes with one scale per
    # token (compression.int8), dequantized on lookup; "per-tensor": ORT's Gather quantization, one scale for
    # the whole table; "fp32": left alone.
    embeddings: str = "per-row"
    # One scale per output channel: a few percent slower than per tensor, but a third to a half as many
    # predictions differ from fp32 on train (benchmarks/int8_backends.py, README "Choosing the int8 path").
    per_channel: bool = True
    threads: int | None = None  # intra-op threads; None = torch.get_num_threads()
    opset: int = 17

    def __post_init__(self):
        if self.embeddings not in EMBEDDING_MODES:
            raise ValueError(f"embeddings must be one of {', '.join(EMBEDDING_MODES)}, got {self.embeddings!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")


def linear_layers(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear not under a skipped prefix; ValueError if there is none."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip)
    ]
    if not found:
        raise ValueError(f"{type(model).__name__} has no linear layers to quantize")
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# --- bnb8 ------------------------------------------------------------------------------------------------


def quantize_bnb8_(model: nn.Module, config: Bnb8Config = Bnb8Config()) -> nn.Module:
    """Replace each quantizable nn.Linear by bitsandbytes' Linear8bitLt, in place, on the model's device."""
    import bitsandbytes as bnb  # imported lazily: it probes for CUDA and logs at import

    # bnb warns on every CPU forward that fp32 inputs are cast to fp16: expected for LLM.int8, not news.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
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


def _bnb8_state(model: nn.Module) -> dict[str, torch.Tensor]:
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


def _load_bnb8(folder: Path, config: Bnb8Config, device: str) -> PreTrainedModel:
    """Rebuild the fp32 skeleton, put dequantized weights in it, and quantize again: the same codes come back."""
    model = empty_classifier(AutoConfig.from_pretrained(folder, local_files_only=True))
    state = load_file(folder / "model.safetensors")
    for key in [k for k in state if k.endswith(".weight_absmax")]:
        weight_key = key.removesuffix("_absmax")
        state[weight_key] = dequantize_rows(state[weight_key], state.pop(key))
    model.load_state_dict(state, strict=True)
    return quantize_bnb8_(model.to(device).eval(), config)  # bnb quantizes when a weight reaches its device


# --- int8 (ONNX Runtime) ---------------------------------------------------------------------------------


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session behind the transformers classifier call: ``model(**batch).logits`` [B, C]."""

    def __init__(self, onnx_bytes: bytes, config, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.onnx_bytes = onnx_bytes
        self.config = config
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_) -> SequenceClassifierOutput:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {}
        for name in self.input_names:
            value = given[name]
            if value is None:
                value = torch.ones_like(input_ids) if name == "attention_mask" else torch.zeros_like(input_ids)
            feed[name] = value.cpu().numpy().astype(np.int64, copy=False)
        (logits,) = self.session.run(["logits"], feed)
        return SequenceClassifierOutput(logits=torch.from_numpy(logits))


def export_onnx(model: PreTrainedModel, path: Path, opset: int = 17) -> None:
    """Export an fp32 classifier to ONNX with dynamic batch and sequence axes."""
    linear_layers(model)
    model = model.eval().cpu()
    names = [n for n in INPUT_NAMES if n != "token_type_ids" or model.config.type_vocab_size > 0]
    example = {n: torch.ones(2, 8, dtype=torch.long) for n in names}
    example["token_type_ids"] = torch.zeros(2, 8, dtype=torch.long)
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches in transformers
        # The TorchScript exporter: one self-contained file, and the graph ORT's BERT fusions know best.
        torch.onnx.export(
            model, tuple(example[n] for n in names), str(path), input_names=names, output_names=["logits"],
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )


def quantize_embedding_rows(proto, min_rows: int = 16):
    """Replace each Gather from a float table of >= `min_rows` rows by a lookup of per-row int8 codes.

    Gather(table, ids) becomes Gather(codes, ids) -> Cast(float) -> Mul(Gather(scales, ids)): one int8 code per
    element plus one float scale per row (token), so a rare token's large vector does not coarsen everyone's.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    tables = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        table = tables.get(node.input[0]) if node.op_type == "Gather" else None
        array = numpy_helper.to_array(table) if table is not None else None
        if array is None or array.ndim != 2 or array.dtype != np.float32 or array.shape[0] < min_rows:
            nodes.append(node)
            continue
        codes, absmax = quantize_rows(torch.from_numpy(array.copy()))
        name, ids, out = table.name, node.input[1], node.output[0]
        graph.initializer.remove(table)
        del tables[name]
        graph.initializer.extend([
            numpy_helper.from_array(codes.numpy(), f"{name}_int8"),
            numpy_helper.from_array((absmax / 127).unsqueeze(1).numpy().astype(np.float32), f"{name}_scale"),
        ])
        axis = [a for a in node.attribute if a.name == "axis"]
        if axis and axis[0].i != 0:
            raise ValueError(f"Gather on {name} uses axis {axis[0].i}; only row lookups can be quantized per row")
        nodes += [
            helper.make_node("Gather", [f"{name}_int8", ids], [f"{out}_codes"], axis=0),
            helper.make_node("Cast", [f"{out}_codes"], [f"{out}_float"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [f"{name}_scale", ids], [f"{out}_scale"], axis=0),
            helper.make_node("Mul", [f"{out}_float", f"{out}_scale"], [out]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def quantize_int8(model: PreTrainedModel, config: Int8Config = Int8Config()) -> OnnxClassifier:
    """ONNX Runtime dynamic int8 of an fp32 classifier (the model itself is left unchanged)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="compression-onnx-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model, fp32, config.opset)
        if config.embeddings == "per-row":
            import onnx

            fp32.write_bytes(quantize_embedding_rows(onnx.load(fp32)).SerializeToString())
        ops = ["MatMul", "Gemm"] + (["Gather"] if config.embeddings == "per-tensor" else [])
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT logs a generic "consider pre-processing" warning on the root logger
        try:
            quantize_dynamic(
                fp32, int8, weight_type=QuantType.QInt8, per_channel=config.per_channel, op_types_to_quantize=ops,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            root.setLevel(level)
        data = int8.read_bytes()
    out = OnnxClassifier(data, model.config, config.threads)
    out.quantization = ("int8", config)
    return out


# --- one entry point, save, load -------------------------------------------------------------------------


def quantize(model: PreTrainedModel, config: Bnb8Config | Int8Config) -> nn.Module:
    """The quantized model for `config`: bnb8 works on (and returns) `model`; int8 returns a new ONNX model."""
    if isinstance(config, Bnb8Config):
        return quantize_bnb8_(model, config)
    if isinstance(config, Int8Config):
        return quantize_int8(model, config)
    raise ValueError(f"unknown quantization config {config!r}")


def backend_name(model: nn.Module) -> str:
    """How a model runs, for the results table."""
    kind = getattr(model, "quantization", (None,))[0]
    if kind == "int8":
        return "onnxruntime-int8"
    device = next(iter(model.parameters())).device.type
    return f"bnb-llm.int8 ({device})" if kind == "bnb8" else f"pytorch-fp32 ({device})"


def save_quantized(model: nn.Module, tokenizer, folder: str | Path) -> None:
    """Write a quantized model (and its tokenizer) into `folder`, which the caller owns."""
    folder = Path(folder)
    kind, config = model.quantization
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if kind == "int8":
        (folder / ONNX_FILE).write_bytes(model.onnx_bytes)
    else:
        save_file(_bnb8_state(model), folder / "model.safetensors")
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}
    (folder / QUANT_FILE).write_text(json.dumps({"backend": kind, "config": settings}, indent=1) + "\n")


def load_model(folder: str | Path, device: str = "cpu") -> tuple[nn.Module, "AutoTokenizer"]:
    """Load any saved variant onto `device`: fp32 (pruned or not), bnb8 or int8 (ONNX Runtime, always CPU)."""
    folder = Path(folder)
    if not (folder / QUANT_FILE).is_file():
        model, tokenizer = load_classifier(folder)
        return model.to(device), tokenizer
    meta = json.loads((folder / QUANT_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    if meta["backend"] == "int8":
        config = Int8Config(**settings)
        model = OnnxClassifier((folder / ONNX_FILE).read_bytes(), AutoConfig.from_pretrained(folder), config.threads)
        model.quantization = ("int8", config)
        return model, tokenizer
    if meta["backend"] == "bnb8":
        return _load_bnb8(folder, Bnb8Config(**settings), device), tokenizer
    raise ValueError(f"{folder / QUANT_FILE}: unknown backend {meta['backend']!r}")
