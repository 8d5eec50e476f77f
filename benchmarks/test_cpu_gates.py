"""CPU gates: every variant's batch-1 latency (pytest-benchmark) and accuracy against baselines.json.

    pytest benchmarks -m "not gpu"                 # the smoke profile (CI)
    pytest benchmarks -m "not gpu" --profile full  # the full profile (trains for about half an hour once)

Latency is gated as a ratio to the fp32 teacher timed in the same session; accuracy as a floor, a drop from the
teacher, and a count of validation predictions that differ from the teacher's (the sharper, paired signal).
"""

from __future__ import annotations

import pytest

from benchmarks.conftest import assert_findings, timed_rounds
from compression import gate
from compression.measure import paired_latency
from compression.schema import VARIANTS as KNOWN

VARIANTS = list(KNOWN)  # every variant a run makes (schema.VARIANTS is the one list)
LATENCY_METRICS = {"latency_ratio"}


@pytest.mark.parametrize("name", VARIANTS)
def test_latency(benchmark, cpu_suite, baselines, teacher_median, name):
    variant = cpu_suite.variant(name)
    row = cpu_suite.rows[name]
    benchmark.group = f"{cpu_suite.run.profile.name} profile, batch 1, CPU"
    benchmark.extra_info.update({k: row[k] for k in ("val_accuracy", "flips", "parameters", "size_mb", "backend")})
    teacher = cpu_suite.variant("teacher").model
    if name == "teacher":
        median = timed_rounds(benchmark, variant.model, cpu_suite.examples(name), cpu_suite.run.profile.warmup)
        # Two independent timings of the same model must agree, or no ratio gate built on them can be trusted.
        assert 0.8 < median / teacher_median < 1.25, f"teacher timed twice: {median:.3f} vs {teacher_median:.3f} ms"
        return
    median = timed_rounds(benchmark, variant.model, cpu_suite.examples(name), cpu_suite.run.profile.warmup)
    # The gate's ratio is timed as `compress run` times it (call by call beside the teacher), so the budgets
    # accepted from a run and the figures checked here come from the same method.
    paired, ref = paired_latency(variant.model, teacher, cpu_suite.examples(name), cpu_suite.run.profile.warmup,
                                 reference_examples=cpu_suite.examples("teacher"))
    ratio, reference = paired.median / ref.median, ref.median
    benchmark.extra_info["latency_ratio_to_teacher"] = round(ratio, 3)
    results = cpu_suite.results([cpu_suite.row("teacher", reference), cpu_suite.row(name, median, ratio)])
    findings = [f for f in gate.check(results, baselines, only={name}) if f.metric in LATENCY_METRICS]
    assert findings, f"baselines.json has no latency budget for {name}"
    assert_findings(findings, name)


@pytest.mark.parametrize("name", VARIANTS)
def test_accuracy_and_size(cpu_suite, baselines, name):
    names = ["teacher", name] if name != "teacher" else [name]
    results = cpu_suite.results([cpu_suite.row(n, median=1.0) for n in names])  # latency is not judged here
    findings = [f for f in gate.check(results, baselines, only={name}) if f.metric not in LATENCY_METRICS]
    assert {f.metric for f in findings} >= {"val_accuracy", "flips", "size_mb"}, f"budgets missing for {name}"
    assert_findings(findings, name)
