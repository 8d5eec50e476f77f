"""The gate itself: an injected accuracy regression fails (the injected slowdown is in test_cpu_gates.py).

This runs on the real variants of the active profile, so it shows that the accuracy budgets in baselines.json
are tight enough for the regressions a CI gate exists to stop; test_cpu_gates.py shows they pass unchanged.
"""

from __future__ import annotations

import copy

import torch

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
