"""compression.gate: baselines validation, checking a run, accepting a run, GPU budgets, failure messages."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import gate
from compression.gate import (
    ACCURACY_SLACK,
    LATENCY_SLACK,
    Finding,
    accept,
    budgets_from,
    check,
    failure_message,
    latency_ratio,
    load_baselines,
)

EMPTY = {"schema_version": 1, "profiles": {}, "gpu": {}}


def row(name, acc, flips, size, median, params=1_000_000, backend="pytorch fp32"):
    return {
        "name": name, "parameters": params, "size_mb": size, "val_accuracy": acc, "flips": flips,
        "latency_ms": {"median": median, "p90": round(median * 1.2, 3), "samples": 300},
        "throughput_per_s": 100.0, "backend": backend,
    }


def make_results(gpu=None, **overrides):
    variants = [
        row("teacher", 90.0, 0, 86.65, 10.0, 22_713_602),
        row("teacher_int8", 89.5, 12, 22.1, 4.0, 22_713_602, "onnxruntime int8"),
        row("student", 88.8, 40, 43.2, 5.0, 11_000_000),
        row("student_int8", 88.4, 52, 11.3, 2.0, 11_000_000, "onnxruntime int8"),
        row("pruned_student", 87.9, 60, 38.0, 4.5, 9_500_000),
    ]
    for v in variants:
        v.update(overrides.get(v["name"], {}))
    return {
        "schema_version": 1, "profile": "smoke", "base": "tiny", "data": "sst2",
        "environment": {"device": "cuda" if gpu else "cpu", "gpu": gpu, "cpu": "Test CPU", "threads": 2},
        "variants": variants,
    }


def find(findings, variant, metric):
    return [f for f in findings if f.variant == variant and f.metric == metric]


def failed(findings):
    return [f for f in findings if not f.ok]


@pytest.fixture
def baselines():
    new, _ = accept([make_results()], EMPTY)
    return new


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
    assert b["teacher"] == {"min_accuracy": 89.4, "max_accuracy_drop": 0.6, "max_flips": 4, "max_size_mb": 88.38}
    assert b["student_int8"] == {
        "min_accuracy": 87.8,
        "max_accuracy_drop": 2.2,
        "max_flips": 56,
        "max_size_mb": 11.53,
        "max_latency_ratio": 0.23,  # 2.0 / 10.0 ms, times 1.15
    }


def test_accept_reports_changes_and_keeps_other_profiles():
    current = {"schema_version": 1, "profiles": {"full": {"teacher": {"min_accuracy": 91.0}},
                                                 "smoke": {"old_variant": {"max_flips": 3}}}, "gpu": {}}
    before = copy.deepcopy(current)
    new, changes = accept([make_results()], current)
    assert current == before  # not modified in place
    assert new["profiles"]["full"] == {"teacher": {"min_accuracy": 91.0}}
    assert set(new["profiles"]["smoke"]) == {"teacher", "teacher_int8", "student", "student_int8", "pruned_student"}
    assert "smoke.old_variant.max_flips: 3 -> None" in changes
    assert "smoke.student_int8.max_flips: None -> 56" in changes
    assert all(line.startswith("smoke.") for line in changes)
    _, again = accept([make_results()], new)
    assert again == []


def test_accept_refuses_gpu_runs():
    with pytest.raises(ValueError, match="GPU"):
        accept([make_results(gpu="Tesla T4")], EMPTY)


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
    results = make_results(student_int8={"latency_ms": {"median": 2.0 * 1.25, "p90": 3.0, "samples": 300}})
    bad = failed(check(results, baselines))
    assert [(f.variant, f.metric) for f in bad] == [("student_int8", "latency_ratio")]
    assert bad[0].value == pytest.approx(0.25) and bad[0].budget == pytest.approx(0.23)


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
    results = make_results()
    results["variants"] = [v for v in results["variants"] if v["name"] != "pruned_student"]
    bad = failed(check(results, baselines))
    assert [(f.variant, f.metric, f.value) for f in bad] == [("pruned_student", "present", None)]
    assert "missing" in bad[0].line()


def test_unknown_profile_is_an_error(baselines):
    results = make_results()
    results["profile"] = "full"
    with pytest.raises(ValueError, match="no profile 'full'"):
        check(results, baselines)


def test_missing_flips_figure_fails(baselines):
    results = make_results()
    del results["variants"][2]["flips"]
    bad = failed(check(results, baselines))
    assert [(f.variant, f.metric, f.value) for f in bad] == [("student", "flips", None)]


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
    return {"profile": draw(st.sampled_from(["smoke", "full"])), "environment": {"device": "cpu", "gpu": None},
            "variants": variants}


@settings(max_examples=30, deadline=None)
@given(results=runs())
def test_accepted_run_always_passes(results):
    new, changes = accept([results], EMPTY)
    assert changes  # everything is new
    findings = check(results, new)
    assert len(findings) == 4 * len(results["variants"]) + (len(results["variants"]) - 1)
    assert not failed(findings), [f.line() for f in failed(findings)]
    # and survives a trip through baselines.json
    assert not failed(check(results, json.loads(json.dumps(new))))


@settings(max_examples=25, deadline=None)
@given(results=runs(), drop=st.integers(61, 3000).map(lambda x: x / 100))
def test_accuracy_regression_always_fails(results, drop):
    new, _ = accept([results], EMPTY)
    worse = copy.deepcopy(results)
    target = worse["variants"][-1]
    target["val_accuracy"] = round(target["val_accuracy"] - drop, 2)
    bad = failed(check(worse, new))
    assert (target["name"], "val_accuracy") in {(f.variant, f.metric) for f in bad}


# --- load_baselines ----------------------------------------------------------------------------------------


def write(tmp_path, doc):
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(doc))
    return path


def test_load_baselines_round_trip(tmp_path, baselines):
    assert load_baselines(write(tmp_path, baselines)) == baselines


def test_load_baselines_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="no such file") as err:
        load_baselines(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"schema_version": 2, "profiles": {}}, "'schema_version'"),
        ({"profiles": {}}, "'schema_version'"),
        ({"schema_version": "1", "profiles": {}}, "'schema_version'"),
        ({"schema_version": 1, "profiles": []}, "'profiles'"),
        ({"schema_version": 1}, "'profiles'"),
        ({"schema_version": 1, "profiles": {"smoke": []}}, "'profiles.smoke'"),
        ({"schema_version": 1, "profiles": {"smoke": {"student": 3}}}, "'profiles.smoke.student'"),
        ({"schema_version": 1, "profiles": {"smoke": {"student": {"max_acuracy": 90}}}},
         "'profiles.smoke.student.max_acuracy'"),
        ({"schema_version": 1, "profiles": {"smoke": {"student": {"max_flips": "10"}}}},
         "'profiles.smoke.student.max_flips'"),
        ({"schema_version": 1, "profiles": {"smoke": {"student": {"max_flips": True}}}},
         "'profiles.smoke.student.max_flips'"),
        ({"schema_version": 1, "profiles": {"smoke": {"student": {"min_accuracy": None}}}},
         "'profiles.smoke.student.min_accuracy'"),
        ({"schema_version": 1, "profiles": {}, "gpu": {"latency_ms": []}}, "'gpu.latency_ms'"),
        ({"schema_version": 1, "profiles": {}, "gpu": {"latency_ms": {"Tesla T4": {"student": "fast"}}}},
         "'gpu.latency_ms'"),
        ({"schema_version": 1, "profiles": {}, "gpu": {"latency_ratio": {"student": None}}}, "'gpu.latency_ratio'"),
    ],
)
def test_load_baselines_errors_name_file_and_key(tmp_path, doc, key):
    path = write(tmp_path, doc)
    with pytest.raises(ValueError) as err:
        load_baselines(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ")
    assert f"key {key}" in msg


def test_load_baselines_gpu_not_an_object(tmp_path):
    path = write(tmp_path, {"schema_version": 1, "profiles": {}, "gpu": []})
    with pytest.raises(ValueError) as err:
        load_baselines(path)
    assert str(err.value).startswith(f"{path}: key 'gpu'")


def test_load_baselines_unknown_key_lists_the_valid_ones(tmp_path):
    path = write(tmp_path, {"schema_version": 1, "profiles": {"smoke": {"student": {"max_acuracy": 90}}}})
    with pytest.raises(ValueError, match="is not a budget") as err:
        load_baselines(path)
    assert all(k in str(err.value) for k in gate.VARIANT_KEYS)


def test_load_baselines_not_an_object(tmp_path):
    path = tmp_path / "baselines.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="JSON object") as err:
        load_baselines(path)
    assert str(path) in str(err.value)


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


def gpu_baselines(baselines):
    out = copy.deepcopy(baselines)
    out["gpu"] = {
        "latency_ms": {"Tesla T4": {"teacher": 12.0, "student": 6.0, "student_int8": 1.5}},
        "latency_ratio": {"student": 0.6, "pruned_student": 0.4},
    }
    return out


def test_known_gpu_uses_absolute_budgets(baselines):
    findings = check(make_results(gpu="Tesla T4"), gpu_baselines(baselines))
    assert not any(f.metric == "latency_ratio" for f in findings)  # CPU ratios are not applied on a GPU
    gpu = [f for f in findings if f.metric == "latency_ms[Tesla T4]"]
    assert [(f.variant, f.budget, f.value, f.ok) for f in gpu] == [
        ("teacher", 12.0, 10.0, True),
        ("student", 6.0, 5.0, True),
        ("student_int8", 1.5, 2.0, False),
    ]
    assert [(f.variant, f.metric) for f in failed(findings)] == [("student_int8", "latency_ms[Tesla T4]")]
    assert not any("unknown GPU" in f.metric for f in findings)


def test_known_gpu_missing_variant(baselines):
    b = gpu_baselines(baselines)
    b["gpu"]["latency_ms"]["Tesla T4"]["distilled"] = 3.0
    (f,) = [f for f in check(make_results(gpu="Tesla T4"), b) if f.variant == "distilled"]
    assert f.value is None and not f.ok


def test_unknown_gpu_uses_latency_ratio(baselines):
    findings = check(make_results(gpu="NVIDIA H100 80GB HBM3"), gpu_baselines(baselines))
    gpu = [f for f in findings if f.metric == "latency_ratio (unknown GPU)"]
    assert [(f.variant, f.budget, f.value, f.ok) for f in gpu] == [
        ("student", 0.6, 0.5, True),
        ("pruned_student", 0.4, 0.45, False),
    ]
    assert not any(f.metric.startswith("latency_ms[") for f in findings)
    assert not any(f.metric == "latency_ratio" for f in findings)


def test_gpu_without_any_gpu_budgets(baselines):
    findings = check(make_results(gpu="Tesla T4"), baselines)
    assert findings and not failed(findings)
    assert not any("latency" in f.metric for f in findings)


def test_accepting_several_runs_takes_the_median_latency_ratio_and_the_worst_accuracy():
    import copy

    runs = [make_results() for _ in range(3)]
    for run, factor in zip(runs, (1.0, 1.3, 0.9)):
        row = next(v for v in run["variants"] if v["name"] == "student_int8")
        row["latency_ms"]["median"] *= factor
    worst = copy.deepcopy(runs[0])
    runs[2] = worst
    next(v for v in worst["variants"] if v["name"] == "student_int8")["val_accuracy"] -= 1.0
    budgets = budgets_from(runs)["student_int8"]
    ratios = sorted(latency_ratio(next(v for v in r["variants"] if v["name"] == "student_int8"),
                                  next(v for v in r["variants"] if v["name"] == "teacher")) for r in runs)
    assert budgets["max_latency_ratio"] == round(ratios[1] * LATENCY_SLACK, 3)
    lowest = min(next(v for v in r["variants"] if v["name"] == "student_int8")["val_accuracy"] for r in runs)
    assert budgets["min_accuracy"] == round(lowest - ACCURACY_SLACK, 2)


def test_runs_of_different_profiles_are_not_accepted_together():
    other = make_results()
    other["profile"] = "full"
    with pytest.raises(ValueError, match="different profiles"):
        accept([make_results(), other], EMPTY)
