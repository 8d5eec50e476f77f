"""The gate itself: an unchanged rerun passes, an injected accuracy regression and an injected slowdown fail.

These run on the real variants of the active profile, so they show that the budgets in baselines.json are
both loose enough for reruns and tight enough for the regressions a CI gate exists to stop.
"""

from __future__ import annotations

import copy
import time

import torch

from compression import gate
from compression.measure import paired_latency, predict

SLOWED = "student_int8"  # the variant CI users ship; the cheapest forward, so the hardest to time
PERTURBED = "student"


def _latency_results(suite, name, model):
    """Results for the teacher and `model` (standing for `name`), timed interleaved like the CPU gate."""
    lat, ref = paired_latency(model, suite.variant("teacher").model, suite.examples(name), suite.run.profile.warmup,
                              reference_examples=suite.examples("teacher"))
    rows = [suite.row("teacher", ref.median), suite.row(name, lat.median, lat.median / ref.median)]
    return suite.results(rows), lat.median


def _ratio_findings(results, baselines, name):
    return [f for f in gate.check(results, baselines, only={name}) if f.metric == "latency_ratio"]


class Delayed(torch.nn.Module):
    """`inner` plus a fixed busy-wait per call (sleep is too coarse at a millisecond)."""

    def __init__(self, inner, seconds: float):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, **batch):
        out = self.inner(**batch)
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return out


def test_rerun_without_change_passes(cpu_suite, baselines):
    """Time every variant again: no latency budget may fail on an unchanged build."""
    failed = []
    for v in cpu_suite.run.variants:
        if v.name == "teacher":
            continue
        results, _ = _latency_results(cpu_suite, v.name, v.model)
        failed += [gate.failure_message(f) for f in _ratio_findings(results, baselines, v.name) if not f.ok]
    assert not failed, "\n".join(failed)


def test_injected_slowdown_is_caught(cpu_suite, baselines):
    model = cpu_suite.variant(SLOWED).model
    clean, median = _latency_results(cpu_suite, SLOWED, model)
    assert all(f.ok for f in _ratio_findings(clean, baselines, SLOWED)), "unchanged run must pass first"
    slowed, _ = _latency_results(cpu_suite, SLOWED, Delayed(model, 0.25 * median / 1000.0))
    findings = _ratio_findings(slowed, baselines, SLOWED)
    assert findings and not any(f.ok for f in findings), f"a 25% slowdown of {SLOWED} passed the gate: {findings}"
    assert SLOWED in gate.failure_message(findings[0])


def test_injected_accuracy_regression_is_caught(cpu_suite, baselines):
    """Add growing weight noise to one variant until more predictions flip than its budget allows."""
    budget = baselines.profiles[cpu_suite.run.profile.name][PERTURBED].max_flips
    source = cpu_suite.variant(PERTURBED).model
    generator = torch.Generator().manual_seed(0)
    teacher_preds = cpu_suite.predictions["teacher"]
    for scale in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5):
        noisy = copy.deepcopy(source)
        with torch.no_grad():
            for p in noisy.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())
        validation = cpu_suite.inputs[PERTURBED][0]
        preds = predict(noisy, validation, cpu_suite.variant(PERTURBED).tokenizer)
        flipped = int((preds != teacher_preds).sum())
        if flipped > budget:
            break
    assert flipped > budget, f"weight noise up to {scale} flipped only {flipped} predictions"
    from compression.measure import accuracy

    row = cpu_suite.row(PERTURBED, 1.0, flips=flipped, val_accuracy=round(accuracy(preds, validation["labels"]), 2))
    findings = gate.check(cpu_suite.results([cpu_suite.row("teacher", 1.0), row]), baselines, only={PERTURBED})
    failed = [f for f in findings if not f.ok]
    assert any(f.metric == "flips" for f in failed), findings
    assert all(f.variant == PERTURBED for f in failed)
