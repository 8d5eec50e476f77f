"""A run's measured rows: every variant's size, accuracy, flips against the teacher, latency and throughput."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from compression.artifacts import size_mb
from compression.data import tokenize
from compression.graphs import serving
from compression.measure import (
    accuracy,
    e2e_latency,
    flips,
    gate_paired_latency,
    latency,
    predict,
    predict_single,
    single_examples,
    throughput,
)
from compression.pipeline import Run, Variant, no_progress
from compression.prune import KEPT_HEADS_KEY
from compression.prune_ffn import KEPT_NEURONS_KEY
from compression.prune_vocab import KEPT_TOKENS_KEY, ORIGINAL_VOCAB_KEY
from compression.quantize import backend_name

log = logging.getLogger(__name__)


def environment(device: str) -> dict:
    """What the figures were measured on."""
    import onnxruntime
    import transformers

    env = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kept_per_layer(config) -> dict:
    """What pruning kept of a model (or of the fp32 model an 8-bit one was made from), from its config: heads and
    FFN neurons per encoder layer, and tokens of the vocabulary (with the count before), each only where some
    were removed."""
    out: dict = {}
    for field, key in (("heads_per_layer", KEPT_HEADS_KEY), ("neurons_per_layer", KEPT_NEURONS_KEY)):
        kept = getattr(config, key, None)
        if kept is not None:
            out[field] = [len(layer) for layer in kept]
    if getattr(config, KEPT_TOKENS_KEY, None) is not None:
        out["tokens_kept"] = getattr(config, KEPT_TOKENS_KEY)
        out["tokens_before"] = getattr(config, ORIGINAL_VOCAB_KEY)
    return out


def quality(
    v: Variant, validation, teacher_predictions: np.ndarray | None, sentences: list[str] | None = None,
    max_length: int = 128,
) -> tuple[dict, np.ndarray]:
    """A variant's row without timings (parameters, size, accuracy, flips, backend), and its predictions [N].

    `validation` is tokenized by the variant's own tokenizer. With `sentences` (the same split, raw), accuracy
    and flips are those of the model as deployed: one sentence per call (`predict_single`), the setting of the
    latency column; the length-sorted batched accuracy is added as `val_accuracy_batched` where it differs (ONNX
    Runtime's dynamic int8 scales activations over the whole padded batch). With `teacher_predictions` None,
    flips are counted against the variant's own predictions (the teacher's row).
    """
    batched = predict(v.model, validation, v.tokenizer)
    preds = batched if sentences is None else predict_single(v.model, sentences, v.tokenizer, max_length)
    row = {
        "name": v.name,
        "parameters": v.parameters,
        "size_mb": round(size_mb(v.folder), 2),
        "val_accuracy": round(accuracy(preds, validation["labels"]), 2),
        "flips": flips(preds, preds if teacher_predictions is None else teacher_predictions),
        "backend": backend_name(v.model),
        "folder": str(v.folder),
        **kept_per_layer(getattr(v.model, "config", None)),
    }
    batched_accuracy = round(accuracy(batched, validation["labels"]), 2)
    if batched_accuracy != row["val_accuracy"]:
        row["val_accuracy_batched"] = batched_accuracy
    return row, preds


def measure_variants(run: Run, progress: Callable[[str], None] = no_progress) -> list[dict]:
    """One row per variant: parameters, size, accuracy, flips against the teacher, latency, throughput.

    Each variant reads the validation sentences through its own tokenizer (teacher and student may differ).
    Accuracy and flips are at batch 1, one sentence per call, as deployed (the gate's figures); latency is the
    model alone on pre-tokenized inputs, and end to end (tokenize + forward).
    """
    split = run.sst2.splits["validation"]
    tokenized: dict[int, tuple] = {}  # per tokenizer: (tokenized split, batch-1 examples)

    def inputs_for(tokenizer):
        if id(tokenizer) not in tokenized:
            ds = tokenize(split, tokenizer, run.profile.teacher.max_length)
            tokenized[id(tokenizer)] = (ds, single_examples(ds, tokenizer, run.profile.latency_examples))
        return tokenized[id(tokenizer)]

    max_length = run.profile.teacher.max_length
    sentences = list(split["sentence"])
    timed = sentences[: run.profile.latency_examples]  # the sentences the latency columns time
    rows, teacher_preds = [], None
    teacher = run.variants[0]
    teacher_examples = inputs_for(teacher.tokenizer)[1]
    teacher_served = serving(teacher.model, teacher.tokenizer.pad_token_id or 0)
    for v in run.variants:
        progress(f"measuring {v.name}")
        validation, examples = inputs_for(v.tokenizer)
        row, preds = quality(v, validation, teacher_preds, sentences, max_length)
        teacher_preds = preds if teacher_preds is None else teacher_preds
        # timings are of the model as served: behind CUDA graphs on a GPU where it can be captured
        served = teacher_served if v is teacher else serving(v.model, v.tokenizer.pad_token_id or 0)
        if served is not v.model:
            row["backend"] += " + CUDA graphs"
        lat = latency(served, examples, warmup=run.profile.warmup)
        if v is not teacher:
            # The gate's ratio is timed in blocks alternating with the teacher's, so both see the same machine
            # state, on one thread (measure.GATE_THREADS); the table's latency is the standalone figure above.
            paired = gate_paired_latency(served, teacher_served, examples, run.profile.warmup, teacher_examples)
            row["latency_ratio"] = round(paired.ratio, 4)
        row["latency_ms"] = {"median": round(lat.median, 3), "p90": round(lat.p90, 3), "samples": lat.samples}
        e2e = e2e_latency(served, v.tokenizer, timed, warmup=run.profile.warmup, max_length=max_length)
        row["e2e_latency_ms"] = {"median": round(e2e.median, 3), "p90": round(e2e.p90, 3), "samples": e2e.samples}
        row["throughput_per_s"] = round(throughput(served, validation, v.tokenizer), 1)
        row["build_seconds"] = v.seconds
        rows.append(row)
        log.info("%s: %s", v.name, row)
    return rows
