"""The gate itself: an injected accuracy regression fails (the injected slowdown is in test_cpu_gates.py), and the
GPU benchmarks' results documents are judged against a card's budgets (checked here, where CI runs, on the CPU
suite's rows: a bug there otherwise shows only on a lent GPU).

This runs on the real variants of the active profile, so it shows that the accuracy budgets in baselines.json
are tight enough for the regressions a CI gate exists to stop; test_cpu_gates.py shows they pass unchanged.
"""

from __future__ import annotations

import copy

import torch

import pytest

from benchmarks.conftest import gpu_latency_findings
from compression import gate
from compression.measure import predict

PERTURBED = "student"


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


CARD = "NVIDIA H200"  # a card baselines.json holds absolute smoke budgets for


@pytest.mark.parametrize("name", ["teacher", "student", "student_bnb8", "slim_student"])
def test_gpu_latency_findings_judge_each_row_against_the_cards_budget(cpu_suite, baselines, name):
    """What benchmarks/test_gpu.py asks of the gate on a GPU, with the CPU suite's rows standing in: half the
    card's budget passes, twice it fails, and the teacher's own document (it names the teacher once) validates."""
    budgets = baselines.gpu.get(cpu_suite.run.profile.name)
    if budgets is None or name not in budgets.latency_ms.get(CARD, {}):
        pytest.skip(f"no {CARD} budget for {name} in profile {cpu_suite.run.profile.name!r}")
    budget = budgets.latency_ms[CARD][name]
    teacher_ms = budgets.latency_ms[CARD]["teacher"] / 2
    for median, ok in ((budget / 2, True), (budget * 2, False)):
        findings = gpu_latency_findings(cpu_suite, baselines, name, median, teacher_ms, CARD)
        assert [f.metric for f in findings] == [f"latency_ms[{CARD}]"] and findings[0].ok is ok, findings
