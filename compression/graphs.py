"""CUDA graphs for batch-1 and small-batch GPU inference: a classifier's forward captured once per padded shape.

A 6-layer, 384-wide encoder over ~20 tokens is microseconds of H100 arithmetic spread over ~100 kernels; eager
PyTorch spends the time launching them. A captured graph replays every kernel of the forward with one launch.
Graphs need static shapes, so each call's inputs are right-padded to the next of a few lengths
(`bucket_length`); the attention mask keeps the padding out of every real token's attention and out of the mean
pool, and right-padding moves no real token's position, so the logits are the unpadded forward's (tested on the
CPU for BERT and MPNet). Shapes beyond the captured ones, and models whose kernels cannot be captured
(bitsandbytes' LLM.int8 with its outlier decomposition synchronises with the host: `capturable`), run eagerly.
A graph replays every kernel the forward launched, ~15 per encoder layer eagerly; with `GraphConfig.compile` the
forward is compiled first (`compiled`: inductor fuses the element-wise kernels around each matmul), so each
replay runs fewer, larger kernels.

    graphed = GraphedClassifier(model, GraphConfig(lengths=(16, 32, 64, 128), batch_sizes=(1,)))
    graphed(input_ids=ids, attention_mask=mask).logits   # [B, C]; first call per shape captures
    served = serving(model, pad_token_id)                # what `compress run` and the GPU benchmarks time
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from compression.measure import accepted_inputs, model_device

log = logging.getLogger(__name__)

# what right-padding writes into each input: the tokenizer's pad id for input_ids (given per model), else 0
PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0}


@dataclass(frozen=True)
class GraphConfig:
    """Which shapes are captured."""

    lengths: tuple[int, ...] = (16, 32, 64, 128)  # padded lengths; SST-2 validation sentences are 5-66 tokens
    batch_sizes: tuple[int, ...] = (1,)  # batch sizes captured; others run eagerly
    warmup: int = 3  # eager calls on a side stream before each capture (lazy cuBLAS/cuDNN set-up)
    compile: bool = False  # capture the forward as `compiled` makes it (fused kernels; compiling takes seconds)

    def __post_init__(self):
        for name in ("lengths", "batch_sizes"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
                raise ValueError(f"{name} must be positive and strictly increasing, got {values}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs a warmed-up stream), got {self.warmup}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")


def bucket_length(n: int, lengths: tuple[int, ...]) -> int | None:
    """The smallest of `lengths` that holds `n` tokens, or None when none does."""
    return next((length for length in lengths if length >= n), None)


def pad_inputs(inputs: dict[str, torch.Tensor], length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Each [B, T] input right-padded to [B, length]: input_ids with `pad_token_id`, the others with 0."""
    out = {}
    for name, tensor in inputs.items():
        extra = length - tensor.shape[1]
        if extra < 0:
            raise ValueError(f"{name} has {tensor.shape[1]} tokens, more than the padded length {length}")
        value = pad_token_id if name == "input_ids" else PAD_VALUES.get(name, 0)
        out[name] = nn.functional.pad(tensor, (0, extra), value=value)
    return out


def capturable(model: nn.Module) -> bool:
    """False for models with modules known to break a CUDA-graph capture.

    bitsandbytes' LLM.int8 with its outlier decomposition (threshold > 0) asks the GPU whether any activation
    is an outlier (`outliers.any()` in its CUDA quantization op, bitsandbytes 0.50) and then gathers a
    data-dependent set of columns: a host synchronisation and a shape no graph can hold. At threshold 0 its
    forward is three registered ops of fixed shapes (row-wise quantization, int8 matmul, dequantization), so it
    is tried; a capture that fails anyway runs eagerly (`GraphedClassifier`). Other bitsandbytes modules are not.
    """
    for m in model.modules():
        if type(m).__module__.startswith("bitsandbytes"):
            state = getattr(m, "state", None)
            if getattr(state, "threshold", None) != 0.0:
                return False
    return True


def compiled(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """`model` under `torch.compile`: one graph (`fullgraph`: a break would split the forward and fail here rather
    than run half-compiled), sizes symbolic so every padded length shares one compilation (a size of 1 is
    specialised, so batch 1 and larger batches compile apart). Compiles on its first call."""
    return torch.compile(model, fullgraph=True, dynamic=True, backend=backend)


# batch 1 (the latency columns) and 32 (measure.throughput's batches)
SERVING = GraphConfig(batch_sizes=(1, 32))


def serving(model: nn.Module, pad_token_id: int = 0, config: GraphConfig = SERVING) -> nn.Module:
    """How a classifier is served where it lives: behind CUDA graphs on a GPU when its kernels can be captured,
    else the model itself (CPU models, ONNX Runtime sessions, bitsandbytes' LLM.int8)."""
    if model_device(model).type != "cuda" or not capturable(model):
        return model
    return GraphedClassifier(model, config, pad_token_id)


class GraphedClassifier(nn.Module):
    """`model` behind CUDA graphs, one per (input names, batch size, padded length); eager where it cannot be.

    The model's weights must not change after the first capture: a graph reads the tensors it captured.
    """

    def __init__(self, model: nn.Module, config: GraphConfig = GraphConfig(), pad_token_id: int = 0):
        super().__init__()
        self.model = model
        self.config = config
        self.pad_token_id = pad_token_id
        self.names = accepted_inputs(model)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self.eager_shapes: set[tuple] = set()  # shapes whose capture failed
        self.graphable = capturable(model)
        # what is captured: the compiled forward while it compiles and captures, else the model's own
        self.compiled = compiled(model) if config.compile and self.graphable else None
        self.training = model.training  # the wrapper alone in the model's mode (nn.Modules are made training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> SequenceClassifierOutput:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        inputs = {k: v for k, v in given.items() if v is not None and k in self.names}
        if "attention_mask" in self.names and "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(input_ids)  # padding needs a mask to stay invisible
        batch, tokens = input_ids.shape
        length = bucket_length(tokens, self.config.lengths)
        key = (tuple(sorted(inputs)), batch, length)
        if (not self.graphable or input_ids.device.type != "cuda" or length is None
                or batch not in self.config.batch_sizes or key in self.eager_shapes):
            return SequenceClassifierOutput(logits=self.model(**inputs).logits)
        padded = pad_inputs(inputs, length, self.pad_token_id)
        if key not in self.graphs:
            captured = self._capture(padded)
            if captured is None:
                self.eager_shapes.add(key)
                return SequenceClassifierOutput(logits=self.model(**inputs).logits)
            self.graphs[key] = captured
        graph, static_inputs, static_logits = self.graphs[key]
        with torch.inference_mode():  # the static tensors were made under it; in-place writes must be too
            for name, tensor in padded.items():
                static_inputs[name].copy_(tensor)
            graph.replay()
            return SequenceClassifierOutput(logits=static_logits.clone())  # the next replay overwrites it

    def _capture(self, padded: dict[str, torch.Tensor]):
        """(graph, static inputs, static logits [B, C]) of one forward over `padded`'s shapes, or None when the
        model's kernels cannot be captured. A compiled forward that fails to compile or capture is given up for
        good (logged), and the model's own forward captured instead."""
        if self.compiled is not None:
            try:
                return self._capture_forward(self.compiled, padded)
            except Exception as err:  # noqa: BLE001 (a compiler fails in many ways: dynamo, inductor, Triton, CUDA)
                self._recover(err, padded, "compiled forward: capturing the eager forward instead")
                self.compiled = None
        try:
            return self._capture_forward(self.model, padded)
        except RuntimeError as err:
            self._recover(err, padded, "running eagerly")
            return None

    @staticmethod
    def _recover(err: Exception, padded: dict[str, torch.Tensor], instead: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        shapes = {k: tuple(v.shape) for k, v in padded.items()}
        log.warning("CUDA graph capture failed for shapes %s (%s): %s: %s", shapes, instead, type(err).__name__, err)

    @torch.inference_mode()
    def _capture_forward(self, forward: nn.Module, padded: dict[str, torch.Tensor]):
        """Warm `forward` up on a side stream (where a compiled forward compiles), then capture one call of it
        over copies of `padded`."""
        static_inputs = {k: v.clone() for k, v in padded.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs asks
            for _ in range(self.config.warmup):
                forward(**static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = forward(**static_inputs).logits
        return graph, static_inputs, static_logits
