"""compression.gate: checking a run, accepting a run, GPU budgets, failure messages (documents: compression.schema)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.gate import (
    ACCURACY_SLACK,
    BNB8_LATENCY_SLACK,
    EMPTY,
    GPU_EAGER_SLACK,
    GPU_FALLBACK_METRIC,
    GPU_LATENCY_SLACK,
    INT8_LATENCY_SLACK,
    LATENCY_SLACK,
    Finding,
    accept,
    budgets_from,
    check,
    cpu_rows_of_gpu_run,
    failure_message,
    latency_ratio,
    latency_slack,
    ungated,
    ungated_gpu_latency,
)
from compression.schema import Baselines, Results, VariantRow, dumps, read_baselines

ENVIRONMENT = {"cpu": "Test CPU", "threads": 2, "python": "3.11.0", "torch": "2.4.0", "transformers": "5.0.0",
               "onnxruntime": "1.20.0", "bitsandbytes": None}


def row(name, acc, flips, size, median, params=1_000_000, backend="pytorch fp32") -> VariantRow:
    return VariantRow(
        name=name, parameters=params, size_mb=size, val_accuracy=acc, flips=flips, backend=backend,
        latency_ms={"median": median, "p90": round(median * 1.2, 3), "samples": 300},
        throughput_per_s=100.0, build_seconds=0.0,
    )


def changed(r: VariantRow, **changes) -> VariantRow:
    """`r` with some figures replaced, validated again."""
    return VariantRow.model_validate({**r.model_dump(), **changes})


def results(variants, profile="smoke", gpu=None) -> Results:
    return Results(
        schema_version=1, profile=profile, base="tiny", data="sst2", pooling="mean",
        environment={**ENVIRONMENT, "device": "cuda" if gpu else "cpu", "gpu": gpu},
        stages_seconds={v.name: 0.0 for v in variants}, total_seconds=1.0, variants=variants,
    )


def make_results(gpu=None, drop=(), **overrides) -> Results:
    variants = [
        row("teacher", 90.0, 0, 86.65, 10.0, 22_713_602),
        row("teacher_int8", 89.5, 12, 22.1, 4.0, 22_713_602, "onnxruntime int8"),
        row("student", 88.8, 40, 43.2, 5.0, 11_000_000),
        row("student_int8", 88.4, 52, 11.3, 2.0, 11_000_000, "onnxruntime int8"),
        row("pruned_student", 87.9, 60, 38.0, 4.5, 9_500_000),
    ]
    variants = [changed(v, **overrides.get(v.name, {})) for v in variants if v.name not in drop]
    return results(variants, gpu=gpu)


def find(findings, variant, metric):
    return [f for f in findings if f.variant == variant and f.metric == metric]


def failed(findings):
    return [f for f in findings if not f.ok]


@pytest.fixture
def baselines() -> Baselines:
    new, _ = accept([make_results()], EMPTY)
    return new


def test_gate_imports_neither_torch_nor_the_models():
    code = ("import sys, compression.gate, compression.schema; "
            "bad = [m for m in ('torch', 'transformers', 'compression.models') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- accept then check -------------------------------------------------------------------------------------


def test_accept_then_check_passes(baselines):
    findings = check(make_results(), baselines)
    assert findings and not failed(findings)
    # every variant gets accuracy, drop, flips and size budgets; all but the teacher a latency ratio
    assert len(findings) == 5 * 4 + 4
    metrics = {f.metric for f in findings if f.variant == "student_int8"}
    assert metrics == {"val_accuracy", "accuracy_drop", "flips", "size_mb", "latency_ratio"}
    assert not find(findings, "teacher", "latency_ratio")


def test_budgets_from_slack():
    b = budgets_from([make_results()])
    assert b["teacher"].model_dump(exclude_none=True) == {
        "min_accuracy": 89.4, "max_accuracy_drop": 0.6, "max_flips": 4, "max_size_mb": 88.38}
    assert b["student_int8"].model_dump(exclude_none=True) == {
        "min_accuracy": 87.8,
        "max_accuracy_drop": 2.2,
        "max_flips": 56,
        "max_size_mb": 11.53,
        "max_latency_ratio": 0.26,  # 2.0 / 10.0 ms, times 1.30 (an int8 row)
    }
    assert b["student"].max_latency_ratio == 0.575  # 5.0 / 10.0 ms, times 1.15 (an fp32 row)


def test_budgets_from_stay_inside_the_schema_ranges():
    # an accuracy of 0.3% minus the slack, a 0.001 MB model, a ratio of 0.0001: still valid budgets
    tiny = make_results(student={"val_accuracy": 0.3, "size_mb": 0.001, "latency_ratio": 0.0001})
    b = budgets_from([tiny])["student"]
    assert b.min_accuracy == 0.0 and b.max_size_mb == 0.01 and b.max_latency_ratio == 0.001
    new, _ = accept([tiny], EMPTY)
    assert not failed(check(tiny, new))


def test_accept_reports_changes_and_keeps_other_profiles():
    current = Baselines.model_validate({
        "schema_version": 1,
        "profiles": {"full": {"teacher": {"min_accuracy": 91.0}}, "smoke": {"teacher_bnb8": {"max_flips": 3}}},
    })
    before = current.model_dump()
    new, changes = accept([make_results()], current)
    assert current.model_dump() == before  # not modified in place
    assert new.profiles["full"]["teacher"].model_dump(exclude_none=True) == {"min_accuracy": 91.0}
    assert set(new.profiles["smoke"]) == {"teacher", "teacher_int8", "student", "student_int8", "pruned_student"}
    assert "smoke.teacher_bnb8.max_flips: 3 -> None" in changes
    assert "smoke.student_int8.max_flips: None -> 56" in changes
    assert all(line.startswith("smoke.") for line in changes)
    _, again = accept([make_results()], new)
    assert again == []


H100 = "NVIDIA H100 80GB HBM3"


def test_accepting_gpu_runs_sets_that_cards_absolute_budgets_only(baselines):
    """The median run's milliseconds with the GPU slack, for every row that ran on the card (not the ONNX
    Runtime rows, which run on the CPU); the CPU profile and the other cards' entries are left as they were."""
    before = gpu_baselines(baselines)

    def gpu_run(student_ms: float) -> Results:
        run = make_results(gpu=H100, student={"latency_ms": {"median": student_ms, "p90": 1.0, "samples": 300}})
        return results([*run.variants, row("student_bnb8", 88.0, 41, 30.0, 4.0, backend="bnb-llm.int8 (cuda)"),
                        row("student_wo8", 88.7, 40, 12.0, 0.28, backend="int8-weight-only (cuda)")], gpu=H100)

    runs = [gpu_run(m) for m in (0.30, 0.50, 0.32)]
    new, changes = accept(runs, before)
    smoke, was = new.gpu_of("smoke"), before.gpu_of("smoke")
    assert new.profiles == before.profiles and smoke.latency_ms["Tesla T4"] == was.latency_ms["Tesla T4"]
    card = smoke.latency_ms[H100]
    assert set(card) == {"teacher", "student", "pruned_student", "student_bnb8", "student_wo8"}  # no _int8 rows
    assert card["student"] == round(0.32 * GPU_LATENCY_SLACK, 3)  # the median run's, not the best or worst
    assert card["teacher"] == round(10.0 * GPU_LATENCY_SLACK, 3)
    assert card["student_bnb8"] == round(4.0 * GPU_EAGER_SLACK, 3)  # bnb8 runs eagerly: host-bound, more slack
    assert smoke.latency_ratio["student"] == round(0.032 * GPU_LATENCY_SLACK, 3)
    assert f"gpu.smoke.latency_ms[{H100}].student: None -> {card['student']}" in changes
    assert all(line.startswith("gpu.") for line in changes)
    # the accepted run passes its own card's gate, and a 30% slower student fails it
    assert not failed(check(runs[2], new))
    assert [(f.variant, f.metric) for f in failed(check(gpu_run(0.32 * 1.3), new))] == [
        ("student", f"latency_ms[{H100}]")]
    _, again = accept(runs, new)
    assert again == []


def test_gpu_budgets_are_kept_per_profile(baselines):
    """A full-size run on a card is judged by the full profile's GPU budgets, never by the smoke models' (which a
    base-size teacher would break tenfold), and accepting it leaves smoke's as they were."""
    smoke_on_h100, _ = accept([make_results(gpu=H100)], baselines)
    full = results(make_results().variants, profile="full", gpu=H100)
    with pytest.raises(ValueError, match="no profile 'full'"):  # no budget of any kind for full: a wrong file
        check(full, smoke_on_h100)
    both, changes = accept([full], smoke_on_h100)
    assert both.gpu_of("smoke") == smoke_on_h100.gpu_of("smoke") and set(both.gpu) == {"smoke", "full"}
    assert all(line.startswith("gpu.full.") for line in changes)
    slower = results([changed(r, latency_ms={"median": r.latency_ms.median * 1.4, "p90": 99.0, "samples": 300})
                      for r in full.variants], profile="full", gpu=H100)
    # full has GPU budgets only: its latency is judged, its accuracy is noted as not gated (no CPU budgets)
    assert {f.variant for f in failed(check(slower, both))} == {"teacher", "student", "pruned_student"}
    assert not failed(check(full, both)) and ungated(full, both) == [r.name for r in full.variants]
    with pytest.raises(ValueError, match="different profiles"):
        accept([make_results(gpu=H100), full], baselines)


@pytest.mark.parametrize("cards, match", [(["Tesla T4", None], "GPU and CPU runs"),
                                          (["Tesla T4", H100], "different GPUs")])
def test_accept_refuses_runs_of_different_machines_together(cards, match):
    with pytest.raises(ValueError, match=match):
        accept([make_results(gpu=card) for card in cards], EMPTY)


@pytest.mark.parametrize("gpu", [None, "Tesla T4"])
def test_accept_refuses_a_run_without_teacher(gpu):
    with pytest.raises(ValueError, match="'teacher'"):
        accept([make_results(gpu=gpu, drop={"teacher"})], EMPTY)


# --- breaches ----------------------------------------------------------------------------------------------


def test_accuracy_drop_of_three_points_fails(baselines):
    results = make_results(student_int8={"val_accuracy": 88.4 - 3})
    bad = failed(check(results, baselines))
    assert {(f.variant, f.metric) for f in bad} == {("student_int8", "val_accuracy"), ("student_int8", "accuracy_drop")}
    (acc,) = find(bad, "student_int8", "val_accuracy")
    assert acc.value == pytest.approx(85.4) and acc.budget == pytest.approx(87.8) and acc.comparison == ">="
    (drop,) = find(bad, "student_int8", "accuracy_drop")
    assert drop.value == pytest.approx(4.6) and drop.budget == pytest.approx(2.2) and drop.comparison == "<="


def test_slower_latency_fails_ratio(baselines):
    results = make_results(student_int8={"latency_ms": {"median": 2.0 * 1.35, "p90": 3.0, "samples": 300}})
    bad = failed(check(results, baselines))
    assert [(f.variant, f.metric) for f in bad] == [("student_int8", "latency_ratio")]
    assert bad[0].value == pytest.approx(0.27) and bad[0].budget == pytest.approx(0.26)


def test_paired_latency_ratio_is_preferred_to_the_ratio_of_medians(baselines):
    # medians say 0.2 (within budget); the paired timing says 0.3: the gate trusts the paired figure
    bad = failed(check(make_results(student_int8={"latency_ratio": 0.3}), baselines))
    assert [(f.variant, f.metric, f.value) for f in bad] == [("student_int8", "latency_ratio", 0.3)]


def test_latency_within_slack_passes(baselines):
    results = make_results(student_int8={"latency_ms": {"median": 2.0 * 1.1, "p90": 3.0, "samples": 300}})
    assert not failed(check(results, baselines))


def test_uniformly_slower_machine_passes(baselines):
    # CPU latency is a ratio to the teacher: a machine twice as slow everywhere is not a regression
    slow = {name: {"latency_ms": {"median": m * 2, "p90": m * 3, "samples": 300}}
            for name, m in [("teacher", 10.0), ("teacher_int8", 4.0), ("student", 5.0), ("student_int8", 2.0),
                            ("pruned_student", 4.5)]}
    assert not failed(check(make_results(**slow), baselines))


def test_more_flips_than_budget_fails(baselines):
    bad = failed(check(make_results(student={"flips": 45}), baselines))
    assert [(f.variant, f.metric, f.value, f.budget) for f in bad] == [("student", "flips", 45, 44)]
    assert not failed(check(make_results(student={"flips": 44}), baselines))


def test_bigger_size_fails(baselines):
    bad = failed(check(make_results(teacher_int8={"size_mb": 30.0}), baselines))
    assert [(f.variant, f.metric) for f in bad] == [("teacher_int8", "size_mb")]


def test_missing_variant_fails_present(baselines):
    bad = failed(check(make_results(drop={"pruned_student"}), baselines))
    assert [(f.variant, f.metric, f.value) for f in bad] == [("pruned_student", "present", None)]
    assert "missing" in bad[0].line()


def test_a_run_without_the_teacher_fails_every_budget_relative_to_it(baselines):
    """Without the teacher row, accuracy drops and CPU latency ratios cannot be judged: each is a breach, never a
    silent pass (a run of one variant against a file budgeting only that variant once passed with nothing checked)."""
    only_student = Baselines.model_validate({"schema_version": baselines.schema_version, "profiles": {
        "smoke": {"student_int8": baselines.profiles["smoke"]["student_int8"].model_dump(exclude_none=True)}}})
    bad = failed(check(make_results(drop={"teacher"}), only_student))
    assert sorted((f.metric, f.value) for f in bad) == [("accuracy_drop", None), ("latency_ratio", None)]
    assert all("missing" in f.line() for f in bad)
    bad = failed(check(make_results(drop={"teacher"}), baselines))
    assert ("teacher", "present") in {(f.variant, f.metric) for f in bad}
    assert {f.variant for f in bad if f.metric == "latency_ratio"} == set(baselines.profiles["smoke"]) - {"teacher"}


def test_unknown_profile_is_an_error(baselines):
    other = make_results().model_copy(update={"profile": "full"})
    with pytest.raises(ValueError, match="no profile 'full'"):
        check(other, baselines)


def test_run_sharing_no_variant_with_the_profile_is_an_error():
    only_teacher = Baselines.model_validate(
        {"schema_version": 1, "profiles": {"smoke": {"teacher_bnb8": {"max_flips": 3}}}})
    with pytest.raises(ValueError, match="shares no variant") as err:
        check(make_results(), only_teacher)
    message = str(err.value)
    assert "run: teacher, teacher_int8, student, student_int8, pruned_student" in message
    assert "baselines: teacher_bnb8" in message
    with pytest.raises(ValueError, match="shares no variant"):
        ungated(make_results(), only_teacher)


def test_variant_without_budgets_is_reported_not_failed(baselines):
    extra = results([*make_results().variants, row("student_bnb8", 88.0, 41, 30.0, 20.0)])
    findings = check(extra, baselines)
    assert not failed(findings)
    assert not any(f.variant == "student_bnb8" for f in findings)
    assert ungated(extra, baselines) == ["student_bnb8"]
    assert ungated(make_results(), baselines) == []


def test_only_restricts_the_check(baselines):
    findings = check(make_results(student={"flips": 99}), baselines, only={"student_int8"})
    assert {f.variant for f in findings} == {"student_int8"} and not failed(findings)


# --- property: an accepted run always passes; a big accuracy regression always fails -----------------------

acc2 = st.integers(5000, 10000).map(lambda x: x / 100)  # pipeline rounds accuracy to 2 decimals
size2 = st.integers(1, 50000).map(lambda x: x / 100)
lat3 = st.integers(50, 100000).map(lambda x: x / 1000)  # and latency to 3


@st.composite
def runs(draw):
    names = draw(st.lists(st.sampled_from(["student", "student_int8", "pruned_student", "teacher_bnb8"]),
                          unique=True, max_size=4))
    variants = [row("teacher", draw(acc2), 0, draw(size2), draw(lat3))]
    for name in names:
        variants.append(row(name, draw(acc2), draw(st.integers(0, 872)), draw(size2), draw(lat3)))
    return results(variants, profile=draw(st.sampled_from(["smoke", "full"])))


@settings(max_examples=30, deadline=None)
@given(run=runs())
def test_accepted_run_always_passes(run):
    new, changes = accept([run], EMPTY)
    assert changes  # everything is new
    findings = check(run, new)
    assert len(findings) == 4 * len(run.variants) + (len(run.variants) - 1)
    assert not failed(findings), [f.line() for f in failed(findings)]
    # and survives a trip through baselines.json
    again = Baselines.model_validate(json.loads(dumps(new)))
    assert again == new and not failed(check(run, again))


@settings(max_examples=25, deadline=None)
@given(run=runs(), drop=st.integers(61, 3000).map(lambda x: x / 100))
def test_accuracy_regression_always_fails(run, drop):
    new, _ = accept([run], EMPTY)
    target = run.variants[-1]
    worse = results([*run.variants[:-1], changed(target, val_accuracy=round(target.val_accuracy - drop, 2))],
                    profile=run.profile)
    bad = failed(check(worse, new))
    assert (target.name, "val_accuracy") in {(f.variant, f.metric) for f in bad}


def test_accepted_baselines_file_round_trip(tmp_path, baselines):
    path = tmp_path / "baselines.json"
    path.write_text(dumps(baselines))
    assert read_baselines(path) == baselines


# --- failure_message ---------------------------------------------------------------------------------------


def test_failure_message_one_line(baselines):
    bad = failed(check(make_results(student_int8={"val_accuracy": 85.4}), baselines))
    (f,) = find(bad, "student_int8", "val_accuracy")
    msg = failure_message(f, "results/results.json")
    assert "\n" not in msg
    assert msg.startswith("student_int8: val_accuracy 85.4 breaks its budget (>= 87.8)")
    assert msg.endswith("compress baselines --accept results/results.json")


def test_failure_message_missing_value():
    f = Finding("pruned_student", "present", 1, None, False, ">=")
    msg = failure_message(f)
    assert msg.startswith("pruned_student: present missing breaks its budget (>= 1)")
    assert "compress baselines --accept RESULTS" in msg
    assert f.line() == "FAIL: pruned_student present = missing (budget >= 1)"


def test_finding_line_ok():
    assert Finding("student", "flips", 44, 40, True, "<=").line() == "ok: student flips = 40 (budget <= 44)"


# --- GPU runs ----------------------------------------------------------------------------------------------


def gpu_baselines(baselines: Baselines, extra: dict | None = None) -> Baselines:
    doc = baselines.model_dump(exclude_none=True)
    doc["gpu"] = {"smoke": {
        "latency_ms": {"Tesla T4": {"teacher": 12.0, "student": 6.0, "student_int8": 1.5, **(extra or {})}},
        "latency_ratio": {"student": 0.6, "pruned_student": 0.4},
    }}
    return Baselines.model_validate(doc)


def test_known_gpu_uses_absolute_budgets(baselines):
    findings = check(make_results(gpu="Tesla T4"), gpu_baselines(baselines))
    assert not any(f.metric == "latency_ratio" for f in findings)  # CPU ratios are not applied on a GPU
    gpu = [f for f in findings if f.metric == "latency_ms[Tesla T4]"]
    assert [(f.variant, f.budget, f.value, f.ok) for f in gpu] == [
        ("teacher", 12.0, 10.0, True),
        ("student", 6.0, 5.0, True),
        ("student_int8", 1.5, 2.0, False),
    ]
    # the card's entry lacks pruned_student: the ratio fallback judges it; student's own entry wins over its ratio
    fallback = [(f.variant, f.budget, f.value, f.ok) for f in findings if f.metric == GPU_FALLBACK_METRIC]
    assert fallback == [("pruned_student", 0.4, 0.45, False)]
    assert [(f.variant, f.metric) for f in failed(findings)] == [
        ("student_int8", "latency_ms[Tesla T4]"), ("pruned_student", GPU_FALLBACK_METRIC)]


def test_known_gpu_missing_variant(baselines):
    b = gpu_baselines(baselines, {"student_bnb8": 3.0})
    (f,) = [f for f in check(make_results(gpu="Tesla T4"), b) if f.variant == "student_bnb8"]
    assert f.value is None and not f.ok


def test_unknown_gpu_uses_latency_ratio(baselines):
    findings = check(make_results(gpu="NVIDIA H100 80GB HBM3"), gpu_baselines(baselines))
    gpu = [f for f in findings if f.metric == GPU_FALLBACK_METRIC]
    assert [(f.variant, f.budget, f.value, f.ok) for f in gpu] == [
        ("student", 0.6, 0.5, True),
        ("pruned_student", 0.4, 0.45, False),
    ]
    assert not any(f.metric.startswith("latency_ms[") for f in findings)
    assert not any(f.metric == "latency_ratio" for f in findings)


@pytest.mark.parametrize("card, expected", [
    ("Tesla T4", ["student_bnb8"]),  # the card's entry and the ratio fallback cover the rest
    ("NVIDIA A100-SXM4-40GB", ["teacher", "student_bnb8"]),  # unknown: only the fallback's two variants
])
def test_ungated_gpu_latency_names_what_no_gpu_budget_covers(baselines, card, expected):
    bnb8 = row("student_bnb8", 88.6, 44, 20.0, 9.0, 11_000_000, backend="bitsandbytes LLM.int8")
    run = results([*make_results().variants, bnb8], gpu=card)
    b = gpu_baselines(baselines)
    assert ungated_gpu_latency(run, b) == expected  # student_int8 and teacher_int8 ran on the CPU: not named
    judged = {f.variant for f in check(run, b) if f.metric.startswith("latency")}
    on_card = {r.name for r in run.variants if not r.backend.startswith("onnxruntime")}
    assert judged.isdisjoint(expected) and on_card <= judged | set(expected)  # each on-card row: judged or named
    assert ungated_gpu_latency(make_results(), b) == []  # a CPU run: its latency is the profile's question
    # the rows that ran on the CPU are named apart, unless a GPU budget (here the T4's, hand-written) covers one
    on_cpu = cpu_rows_of_gpu_run(run, b)
    assert on_cpu == (["teacher_int8"] if card == "Tesla T4" else ["teacher_int8", "student_int8"])
    assert not any(f.metric.startswith("latency") and f.variant in on_cpu for f in check(run, b))
    assert cpu_rows_of_gpu_run(make_results(), b) == []


def test_gpu_without_any_gpu_budgets(baselines):
    findings = check(make_results(gpu="Tesla T4"), baselines)
    assert findings and not failed(findings)
    assert not any("latency" in f.metric for f in findings)


# --- several runs ------------------------------------------------------------------------------------------


def test_accepting_several_runs_takes_the_worst_figure_and_the_median_ratio():
    # Three distinct runs: ratios 0.26 / 0.20 / 0.18 (median 0.20), accuracies 88.4 / 87.4 / 88.9 (worst 87.4),
    # flips 52 / 50 / 61 (worst 61); a min, max or mean ratio, or a best-run accuracy or flip count, would each
    # give another budget.
    figures = [(2.6, 88.4, 52), (2.0, 87.4, 50), (1.8, 88.9, 61)]
    runs = [make_results(student_int8={"latency_ms": {"median": median, "p90": 4.0, "samples": 300},
                                       "val_accuracy": acc, "flips": flips})
            for median, acc, flips in figures]
    ratios = [latency_ratio(r.rows()["student_int8"], r.rows()["teacher"]) for r in runs]
    assert len(set(ratios)) == 3  # distinct, so median, min, max and mean differ
    budgets = budgets_from(runs)["student_int8"]
    assert budgets.max_latency_ratio == round(0.20 * INT8_LATENCY_SLACK, 3)
    others = (min(ratios), max(ratios), sum(ratios) / 3)
    assert budgets.max_latency_ratio not in {round(x * INT8_LATENCY_SLACK, 3) for x in others}
    assert budgets.min_accuracy == round(87.4 - ACCURACY_SLACK, 2)
    assert budgets.max_accuracy_drop == round(90.0 - 87.4 + ACCURACY_SLACK, 2)
    assert budgets.max_flips == 61 + 4


@pytest.mark.parametrize("name, slowdown", [("student", 0.2), ("student_int8", 0.4)])
def test_one_slow_accepted_run_does_not_lift_the_budget_past_the_slowdown_it_must_catch(name, slowdown):
    # five runs 15% apart (CI's case); the usual ratio slowed by what CI injects must break the accepted budget
    medians = [0.959, 0.989, 1.101, 1.096, 1.003]  # ms against the teacher's 10 ms
    runs = [make_results(**{name: {"latency_ms": {"median": m, "p90": 4.0, "samples": 300}}}) for m in medians]
    budget = budgets_from(runs)[name].max_latency_ratio
    assert all(m / 10.0 <= budget for m in medians)  # no unchanged run breaks it
    assert sorted(medians)[2] / 10.0 * (1 + slowdown) > budget  # that slowdown of the usual (median) run does


def test_latency_slack_by_backend():
    assert latency_slack("student") == latency_slack("slim_student") == LATENCY_SLACK
    assert latency_slack("teacher_int8") == latency_slack("pruned_student_int8") == INT8_LATENCY_SLACK
    assert latency_slack("student_bnb8") == BNB8_LATENCY_SLACK
    assert LATENCY_SLACK < INT8_LATENCY_SLACK < BNB8_LATENCY_SLACK  # the steadiest ratio (fp32) the tightest gate


def test_accepting_runs_in_any_order_gives_the_same_budgets():
    figures = [(2.6, 88.4), (2.0, 87.4), (1.8, 88.9)]
    runs = [make_results(student_int8={"latency_ms": {"median": m, "p90": 4.0, "samples": 300}, "val_accuracy": a})
            for m, a in figures]
    assert budgets_from(runs) == budgets_from(runs[::-1]) == budgets_from([runs[1], runs[2], runs[0]])


def test_a_variant_only_a_later_run_has_gets_budgets_too():
    # an older run without the newest variant accepted first: the newer run's variant is still budgeted
    older, newer = make_results(drop=("pruned_student",)), make_results()
    for runs in ([older, newer], [newer, older]):
        budgets = budgets_from(runs)
        assert list(budgets) == ["teacher", "teacher_int8", "student", "student_int8", "pruned_student"]
        assert budgets["pruned_student"] == budgets_from([newer])["pruned_student"]


def test_runs_of_different_profiles_are_not_accepted_together():
    other = make_results().model_copy(update={"profile": "full"})
    with pytest.raises(ValueError, match="different profiles"):
        accept([make_results(), other], EMPTY)


# --- the benchmarks' hand-built documents go through the schema too ----------------------------------------


def test_benchmark_suite_builds_valid_results_the_gate_reads(baselines):
    from types import SimpleNamespace

    from benchmarks.conftest import Suite

    quality = {v.name: {k: getattr(v, k) for k in ("name", "parameters", "size_mb", "val_accuracy", "flips", "backend")}
               for v in make_results().variants}
    run = SimpleNamespace(
        profile=SimpleNamespace(name="smoke", pooling="mean"), sst2=SimpleNamespace(source="/data/sst2"),
        stages={name: 1.5 for name in quality}, variants=[SimpleNamespace(name=n, seconds=1.5) for n in quality],
    )
    inputs = {name: (None, [object()] * 300) for name in quality}  # (tokenized split, timed examples) per variant
    suite = Suite(run, inputs, quality, {}, "cpu", {**ENVIRONMENT, "device": "cpu", "gpu": None})
    row_ = suite.row("student_int8", 2.5, latency_ratio=0.28, flips=53)
    assert isinstance(row_, VariantRow)
    assert (row_.latency_ms.median, row_.latency_ms.samples, row_.flips, row_.build_seconds) == (2.5, 300, 53, 1.5)
    doc = suite.results([suite.row("teacher", 10.0), row_])
    assert isinstance(doc, Results) and doc.total_seconds == 7.5
    bad = failed(check(doc, baselines, only={"student_int8"}))
    assert [(f.metric, f.value) for f in bad] == [("latency_ratio", 0.28)]  # budget 0.2 x INT8_LATENCY_SLACK
    with pytest.raises(ValueError, match="val_accuracy"):
        suite.row("student", 1.0, val_accuracy=float("nan"))


@pytest.mark.parametrize("breached, decided", [
    ([False], True),  # a clean first timing passes at once
    ([True], False), ([True, False], False),  # one breach: time again until a majority decides
    ([True, True], True), ([True, False, False], True), ([True, False, True], True),
    ([False, True], False),  # (only the first timing stops early when clean)
])
def test_a_latency_breach_is_retimed_until_a_majority_of_three_decides(breached, decided):
    from benchmarks.conftest import _decided

    assert _decided(breached, attempts=3) is decided


def test_bnb8_rows_get_the_looser_latency_slack():
    run = results([*make_results().variants, row("student_bnb8", 88.0, 41, 30.0, 4.0, 11_000_000)])
    budgets = budgets_from([run])
    assert budgets["student_bnb8"].max_latency_ratio == round(0.4 * BNB8_LATENCY_SLACK, 3)
    assert budgets["student_int8"].max_latency_ratio == round(0.2 * INT8_LATENCY_SLACK, 3)
