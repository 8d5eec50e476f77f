"""ONNX Runtime dynamic int8: the fastest 8-bit path on CPU, chosen by measurement (benchmarks/int8_backends.py).

The fp32 model is exported to ONNX and quantized by ONNX Runtime's dynamic quantization: int8 weights per output
channel, activations quantized per call, VNNI kernels; embedding tables as per-row int8 codes. The artifact is
one `.onnx` file that onnxruntime runs without this package or torch.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from compression.int8 import quantize_rows
from compression.models import check_float_model, evaluating, linear_layers

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
EMBEDDING_MODES = ("per-row", "per-tensor", "fp32")


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

    def with_threads(self, threads: int) -> OnnxClassifier:
        """The same model in a new session with `threads` intra-op threads (ORT fixes them per session)."""
        return OnnxClassifier(self.onnx_bytes, self.config, threads)

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
    """Export an fp32 classifier to ONNX with dynamic batch and sequence axes (traced in eval mode on the CPU;
    the model is handed back in the mode and on the device it came in)."""
    linear_layers(model)
    device = next(model.parameters()).device
    try:
        with evaluating(model):
            _export(model.cpu(), path, opset)
    finally:
        model.to(device)


def _export(model: PreTrainedModel, path: Path, opset: int) -> None:
    names = [n for n in INPUT_NAMES if n != "token_type_ids" or getattr(model.config, "type_vocab_size", 0) > 0]
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
        # (suffixes ORT's own dynamic quantization does not use: it names its tensors `{input}_scale`, ..., and
        # a factored embedding's lookup feeds a MatMul that it quantizes)
        nodes += [
            helper.make_node("Gather", [f"{name}_int8", ids], [f"{out}_row_codes"], axis=0),
            helper.make_node("Cast", [f"{out}_row_codes"], [f"{out}_row_float"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [f"{name}_scale", ids], [f"{out}_row_scale"], axis=0),
            helper.make_node("Mul", [f"{out}_row_float", f"{out}_row_scale"], [out]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def quantize_int8(model: PreTrainedModel, config: Int8Config = Int8Config()) -> OnnxClassifier:
    """ONNX Runtime dynamic int8 of an fp32 classifier (the model itself is left unchanged, and the result keeps a
    copy of its config: later cuts of the model do not change what the ONNX model says it is)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    check_float_model(model, "int8 quantization")

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
    out = OnnxClassifier(data, copy.deepcopy(model.config), config.threads)
    out.quantization = ("int8", config)
    return out


