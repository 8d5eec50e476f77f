"""CPU gates: every variant's batch-1 latency (pytest-benchmark) and accuracy against baselines.json.

    pytest benchmarks -m "not gpu"                 # the smoke profile (CI)
    pytest benchmarks -m "not gpu" --profile full  # the full profile (trains for about half an hour once)

Latency is gated as a ratio to the fp32 teacher timed in the same session; accuracy as a floor, a drop from the
teacher, and a count of validation predictions that differ from the teacher's (the sharper, paired signal).
"""

from __future__ import annotations

import statistics

import pytest

from benchmarks.conftest import (SELF_RATIO_BOUND, assert_findings, delayed, gated_latency, self_paired_ratios,
                                 slowdown_for, timed_rounds)
from compression import gate
from compression.schema import VARIANTS as KNOWN

VARIANTS = list(KNOWN)  # every variant a run makes (schema.VARIANTS is the one list)
LATENCY_METRICS = {"latency_ratio"}
# Where CI injects a slowdown: the cheapest int8 forward (hardest to time; 40%, as its gate is looser), the fp32
# student (20%) and the noisiest bnb8 row (60%, its gate the loosest: gate.latency_slack).
# `python -m benchmarks.gate_noise` injects them into every variant, many times.
SLOWED = ["student_int8", "student", "slim_student_bnb8"]


@pytest.mark.parametrize("name", VARIANTS)
def test_latency(benchmark, cpu_suite, baselines, name):
    variant = cpu_suite.variant(name)
    row = cpu_suite.rows[name]
    benchmark.group = f"{cpu_suite.run.profile.name} profile, batch 1, CPU"
    benchmark.extra_info.update({k: row[k] for k in ("val_accuracy", "flips", "parameters", "size_mb", "backend")})
    median = timed_rounds(benchmark, variant.model, cpu_suite.examples(name), cpu_suite.run.profile.warmup)
    if name == "teacher":
        # Every gate is a ratio timed beside the teacher, so the teacher timed beside itself by the same method must
        # read 1 within SELF_RATIO_BOUND (tighter than any gate's slack), or no ratio gate can be trusted. (Two
        # timings minutes apart would not do: a shared machine's speed drifts by a quarter between minutes, 13.9-18.3 ms here, which fails the
        # build and says nothing about the gates.)
        low, high = 1 / SELF_RATIO_BOUND, SELF_RATIO_BOUND
        ratios = self_paired_ratios(cpu_suite, low, high)
        benchmark.extra_info["self_ratio"] = [round(r, 4) for r in ratios]
        assert low < statistics.median(ratios) < high, (
            f"the teacher timed beside itself read {[round(r, 4) for r in ratios]}, not 1 within x{high}: "
            "the paired timing is biased, and no latency ratio gate can be trusted")
        return
    # The gate's ratio is timed as `compress run` times it (in blocks alternating with the teacher), so the
    # budgets accepted from a run and the figures checked here come from the same method.
    judged = gated_latency(cpu_suite, name, variant.model, baselines)
    benchmark.extra_info["latency_ratio_to_teacher"] = [round(r, 4) for r in judged.ratios]
    assert judged.findings, f"baselines.json has no latency budget for {name}"
    assert_findings(judged.findings, name, attempts=judged.ratios)


@pytest.mark.parametrize("name", SLOWED)
def test_injected_slowdown_is_caught(cpu_suite, baselines, name):
    """A slower forward of a gated variant (20%; 40% for int8, 60% for bnb8) fails its latency budget, re-measurement included."""
    model, slowdown = cpu_suite.variant(name).model, slowdown_for(name)
    clean = gated_latency(cpu_suite, name, model, baselines, attempts=1)
    slowed = gated_latency(cpu_suite, name, delayed(model, slowdown * clean.model_ms / 1000.0), baselines)
    assert not slowed.ok, (f"a {slowdown:.0%} slowdown of {name} passed its latency budget: ratios "
                           f"{[round(r, 4) for r in slowed.ratios]} (unchanged: {clean.ratios[0]:.4f})")


@pytest.mark.parametrize("name", VARIANTS)
def test_accuracy_and_size(cpu_suite, baselines, name):
    names = ["teacher", name] if name != "teacher" else [name]
    results = cpu_suite.results([cpu_suite.row(n, median=1.0) for n in names])  # latency is not judged here
    findings = [f for f in gate.check(results, baselines, only={name}) if f.metric not in LATENCY_METRICS]
    assert {f.metric for f in findings} >= {"val_accuracy", "flips", "size_mb"}, f"budgets missing for {name}"
    assert_findings(findings, name)
