"""GPU latency benchmarks (fp32, bnb8 and wo8 variants), marked `gpu`; they skip where CUDA is not available.

    pytest -m gpu --benchmark-autosave      # saves under .benchmarks/

Each model is timed as `compress run` serves it on a GPU (`compression.graphs.serving`): behind CUDA graphs
where its kernels can be captured (fp32, wo8), eagerly where not (bnb8).

Each variant's batch-1 median is gated against the profile's absolute budget for this GPU in baselines.json
(`gpu.<profile>.latency_ms["<device name>"]`; the full profile's `Tesla T4` entry holds the reference table's
figures), or, for a variant the card's entry lacks, against the profile's ratio-to-teacher fallback
(`gpu.<profile>.latency_ratio`); a variant with neither skips, naming the command that sets one. Accuracy is
gated on the CPU, where CI runs; here it is recorded in the benchmark's extra_info.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import assert_findings, build_suite, gpu_latency_findings, timed_rounds
from compression.graphs import GraphedClassifier, serving
from compression.measure import latency
from compression.schema import GPU_VARIANTS as WO8_VARIANTS
from compression.schema import VARIANTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the gpu benchmarks need one"),
]

# ONNX Runtime int8 runs on the CPU; the wo8 variants are made by a run on a GPU only
GPU_VARIANTS = [name for name in (*VARIANTS, *WO8_VARIANTS) if not name.endswith("_int8")]


@pytest.fixture(scope="session")
def gpu_suite(profile_name):
    return build_suite(profile_name, "cuda")


def served(suite, name: str):
    """`name` as served on the GPU, every padded shape of its timed sentences already captured (one untimed pass),
    so no capture falls inside a timing."""
    variant = suite.variant(name)
    model = serving(variant.model, variant.tokenizer.pad_token_id or 0)
    if isinstance(model, GraphedClassifier):
        latency(model, suite.examples(name), warmup=0, warmup_seconds=0)
    return model


@pytest.fixture(scope="session")
def gpu_teacher_median(gpu_suite) -> float:
    return latency(served(gpu_suite, "teacher"), gpu_suite.examples("teacher"), gpu_suite.run.profile.warmup).median


@pytest.mark.parametrize("name", GPU_VARIANTS)
def test_gpu_latency(benchmark, gpu_suite, baselines, gpu_teacher_median, name):
    device_name = torch.cuda.get_device_name(0)
    row = gpu_suite.rows[name]
    benchmark.group = f"{gpu_suite.run.profile.name} profile, batch 1, {device_name}"
    benchmark.extra_info.update({k: row[k] for k in ("val_accuracy", "flips", "parameters", "size_mb", "backend")})
    median = timed_rounds(benchmark, served(gpu_suite, name), gpu_suite.examples(name), gpu_suite.run.profile.warmup)
    benchmark.extra_info["latency_ratio_to_teacher"] = round(median / gpu_teacher_median, 3)
    findings = gpu_latency_findings(gpu_suite, baselines, name, median, gpu_teacher_median, device_name)
    if name == "teacher" and not findings:  # the fallback ratios' denominator: timed twice, the two must agree
        assert 0.8 < median / gpu_teacher_median < 1.25, "teacher timed twice disagrees"
        return
    if not findings:  # ungated on this card, as `compress check` notes it (gate.ungated_gpu_latency)
        profile = gpu_suite.run.profile.name
        pytest.skip(f"no GPU latency budget for {name} on {device_name} in profile {profile!r} (gpu.{profile} in "
                    f"baselines.json): set one with compress baselines --accept RESULTS of a run on this card")
    assert_findings(findings, name)
