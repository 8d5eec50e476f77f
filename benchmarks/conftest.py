"""Benchmark fixtures: every variant of the active profile, built once per session (or loaded from the cache).

The profile comes from `--profile` or $COMPRESSION_PROFILE (default `smoke`); the data from $SST2_DIR (else GLUE
from the hub); budgets from `--baselines` (default: the repository's baselines.json).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from compression.schema import SCHEMA_VERSION, Baselines, Latency, Results, VariantRow

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    group = parser.getgroup("compression")
    group.addoption("--profile", default=os.environ.get("COMPRESSION_PROFILE", "smoke"), choices=["smoke", "minilm", "full"],
                    help="compression profile the benchmarks build and gate (default: smoke)")
    group.addoption("--baselines", default=str(ROOT / "baselines.json"), help="budgets file")


@dataclass
class Suite:
    """A built run, plus what every test needs from it."""

    run: object  # compression.pipeline.Run
    inputs: dict  # name -> (validation split tokenized by its tokenizer, batch-1 inputs timed for latency)
    rows: dict  # name -> quality row (no timings): parameters, size, accuracy, flips, backend
    predictions: dict  # name -> predictions [N]
    device: str
    environment: dict  # compression.rows.environment(device)

    def variant(self, name: str):
        return next(v for v in self.run.variants if v.name == name)

    def examples(self, name: str) -> list:
        """Batch-1 inputs of `name`, through its own tokenizer (the same sentences for every variant)."""
        return self.inputs[name][1]

    def row(self, name: str, median: float, latency_ratio: float | None = None, **changes) -> VariantRow:
        """`name`'s results row: its quality figures (with `changes`) and a batch-1 median timed by the test.

        The benchmarks time only the median, which is all the gate reads: it stands in for p90 too, and the
        throughput is the batch-1 one it implies.
        """
        return VariantRow(
            **{**self.rows[name], **changes},
            latency_ms=Latency(median=median, p90=median, samples=len(self.examples(name))),
            latency_ratio=latency_ratio,
            throughput_per_s=1000.0 / median,
            build_seconds=self.variant(name).seconds,
        )

    def results(self, rows: list[VariantRow], gpu: str | None = None) -> Results:
        """A results document in `compress run`'s shape (validated by the schema), for `compression.gate.check`."""
        return Results(
            schema_version=SCHEMA_VERSION,
            profile=self.run.profile.name,
            base="embedded default (the benchmarks build without --base)",
            data=self.run.sst2.source,
            pooling=self.run.profile.pooling,
            environment={**self.environment, "gpu": gpu},
            stages_seconds=self.run.stages,
            total_seconds=round(sum(self.run.stages.values()), 1),
            variants=rows,
        )


def build_suite(profile_name: str, device: str) -> Suite:
    import torch

    from compression import pipeline, rows as measured
    from compression.data import tokenize
    from compression.measure import single_examples
    from compression.profiles import get_profile

    profile = get_profile(profile_name)
    run = pipeline.build_then_load(profile, device=device, threads=torch.get_num_threads())
    split, by_tokenizer, inputs = run.sst2.splits["validation"], {}, {}
    rows, predictions, teacher = {}, {}, None
    for v in run.variants:
        if id(v.tokenizer) not in by_tokenizer:
            ds = tokenize(split, v.tokenizer, profile.teacher.max_length)
            by_tokenizer[id(v.tokenizer)] = (ds, single_examples(ds, v.tokenizer, profile.latency_examples))
        inputs[v.name] = by_tokenizer[id(v.tokenizer)]
        # accuracy and flips as deployed (one sentence per call): the figures baselines.json is accepted from
        row, preds = measured.quality(v, inputs[v.name][0], teacher, list(split["sentence"]), profile.teacher.max_length)
        teacher = preds if teacher is None else teacher
        rows[v.name], predictions[v.name] = row, preds
    return Suite(run, inputs, rows, predictions, device, measured.environment(device))


@pytest.fixture(scope="session")
def profile_name(request) -> str:
    return request.config.getoption("--profile")


@pytest.fixture(scope="session")
def baselines(request) -> Baselines:
    from compression.schema import read_baselines

    return read_baselines(request.config.getoption("--baselines"))


@pytest.fixture(scope="session")
def cpu_suite(profile_name) -> Suite:
    import torch

    torch.set_num_threads(int(os.environ.get("COMPRESSION_THREADS", torch.get_num_threads())))
    return build_suite(profile_name, "cpu")


def timed_rounds(benchmark, model, examples, warmup: int) -> float:
    """benchmark.pedantic of a batch-1 forward, one round per example in turn; returns the median in ms."""
    import torch

    from compression.measure import model_device, to_device

    device = model_device(model)
    examples = [to_device(e, device) for e in examples]
    cursor = {"i": 0}

    def setup():
        example = examples[cursor["i"] % len(examples)]
        cursor["i"] += 1
        return (), example

    def forward(**example):
        with torch.inference_mode():
            model(**example)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    benchmark.pedantic(forward, setup=setup, rounds=len(examples), warmup_rounds=warmup, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: pedantic ran the function once, untimed
        from compression.measure import latency

        return latency(model, examples, warmup).median
    return benchmark.stats.stats.median * 1000.0


# A latency breach is timed again before it fails (asv-style), and judged on the median of up to three timings:
# one disturbed timing neither fails a build nor hides a real slowdown, which shows in every timing.
ATTEMPTS = 3
# the injected slowdowns the CPU gate must catch (a busy-wait of this fraction of each call)
SLOWDOWN = 0.20  # the fp32 rows' (gate.LATENCY_SLACK, the tightest)
LOOSE_SLOWDOWN = 0.40  # the int8 rows' (gate.INT8_LATENCY_SLACK)
LOOSEST_SLOWDOWN = 0.60  # the bnb8 rows' (gate.BNB8_LATENCY_SLACK)
# The teacher timed beside itself must read 1 within this (0.98-1.04 in eight timings on one machine; a 3 ms
# busy-wait on one side, about 20%, read 1.19 and 1.24): the paired timing's bias, tighter than any budget's slack.
SELF_RATIO_BOUND = 1.15


def slowdown_for(name: str) -> float:
    """The injected slowdown variant `name`'s latency gate must catch: 20% where its slack is the tightest (fp32),
    40% for int8, 60% for the loosest (bnb8)."""
    from compression import gate

    slack = gate.latency_slack(name)
    if slack <= gate.LATENCY_SLACK:
        return SLOWDOWN
    return LOOSE_SLOWDOWN if slack <= gate.INT8_LATENCY_SLACK else LOOSEST_SLOWDOWN


@dataclass
class GatedLatency:
    """A variant's CPU latency as the gate judged it."""

    findings: list  # compression.gate.Finding for latency_ratio, from the median of `ratios`
    ratios: list = field(default_factory=list)  # each attempt's paired ratio to the teacher
    model_ms: float = 0.0  # the last attempt's median batch-1 forward of the model
    reference_ms: float = 0.0  # and of the teacher beside it

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)


def gated_latency(suite: Suite, name: str, model, baselines, attempts: int = ATTEMPTS) -> GatedLatency:
    """`model` (standing for variant `name`) timed beside the teacher and judged against `name`'s ratio budget.

    A breach is re-timed: the judged ratio is the median of up to `attempts` timings, and timing stops as soon as
    that median is decided (a pass first time, or a majority of breaches).
    """
    from compression import gate
    from compression.measure import gate_paired_latency

    teacher = suite.variant("teacher").model
    out = GatedLatency(findings=[])
    while len(out.ratios) < attempts:
        p = gate_paired_latency(model, teacher, suite.examples(name), suite.run.profile.warmup,
                                suite.examples("teacher"))
        out.ratios.append(p.ratio)
        out.model_ms, out.reference_ms = p.model.median, p.reference.median
        results = suite.results([suite.row("teacher", p.reference.median),
                                 suite.row(name, p.model.median, statistics.median(out.ratios))])
        out.findings = [f for f in gate.check(results, baselines, only={name}) if f.metric == "latency_ratio"]
        if _decided([_breaches(suite, name, r, baselines) for r in out.ratios], attempts):
            break
    return out


def gpu_latency_findings(suite: Suite, baselines, name: str, median: float, teacher_median: float,
                         device_name: str) -> list:
    """The gate's latency findings for variant `name` timed at `median` ms on GPU `device_name`, beside the teacher
    at `teacher_median`: against the card's absolute budget, else the profile's ratio-to-teacher fallback (empty
    where neither exists)."""
    from compression import gate

    # the teacher's own row is its own timing: a results document names each variant once (the schema's rule)
    rows = [suite.row(name, median)]
    if name != "teacher":
        rows.insert(0, suite.row("teacher", teacher_median))
    results = suite.results(rows, gpu=device_name)
    return [f for f in gate.check(results, baselines, only={name}) if f.metric.startswith("latency")]


def self_paired_ratios(suite: Suite, low: float, high: float, attempts: int = ATTEMPTS) -> list[float]:
    """The teacher timed beside itself as the gate times a variant beside it (an A/A test): each attempt's ratio.

    A ratio outside (low, high) is re-timed like a gate's breach, so the median of the returned ratios decides.
    """
    from compression.measure import gate_paired_latency

    teacher, examples = suite.variant("teacher").model, suite.examples("teacher")
    ratios: list[float] = []
    while len(ratios) < attempts:
        ratios.append(gate_paired_latency(teacher, teacher, examples, suite.run.profile.warmup).ratio)
        if _decided([not low < r < high for r in ratios], attempts):
            break
    return ratios


def _decided(breached: list[bool], attempts: int) -> bool:
    """Whether the median of up to `attempts` timings is settled: a clean first timing, or a majority either way."""
    breaches = sum(breached)
    return breaches == 0 or breaches > attempts // 2 or len(breached) - breaches > attempts // 2


def _breaches(suite: Suite, name: str, ratio: float, baselines) -> bool:
    budgets = baselines.profiles.get(suite.run.profile.name, {}).get(name)
    return budgets is not None and budgets.max_latency_ratio is not None and round(ratio, 3) > budgets.max_latency_ratio


def delayed(inner, seconds: float):
    """`inner` plus a fixed busy-wait per call: an injected slowdown (sleep is too coarse at a millisecond)."""
    import torch

    class Delayed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, **batch):
            out = self.inner(**batch)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
            return out

        def with_threads(self, threads: int):  # as measure.paired_latency re-opens ONNX Runtime models
            reopen = getattr(inner, "with_threads", None)
            return delayed(reopen(threads), seconds) if reopen is not None else self

    return Delayed()


def assert_findings(findings, variant: str, attempts: list | None = None) -> None:
    """Fail with one line per breached budget (variant, metric, budget, value, how to accept)."""
    from compression.gate import failure_message

    hint = "results/results.json (after: compress run --profile PROFILE --out results)"
    timed = f" (median of {len(attempts)} timings: {', '.join(f'{r:.4f}' for r in attempts)})" if attempts else ""
    failed = [failure_message(f, hint) + (timed if f.metric == "latency_ratio" else "")
              for f in findings if not f.ok and f.variant == variant]
    assert not failed, "\n".join(failed)


