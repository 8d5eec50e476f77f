"""Regression gate: a run's figures against the budgets in baselines.json.

Schema (version 1), documented in the README:

    {"schema_version": 1,
     "profiles": {"<profile>": {"<variant>": {"min_accuracy": %, "max_accuracy_drop": points,
                                            "max_flips": n, "max_size_mb": MB, "max_latency_ratio": x}}},
     "gpu": {"latency_ms": {"<device name>": {"<variant>": ms}},
             "latency_ratio": {"<variant>": x}}}

CPU latency is judged as a ratio to the fp32 teacher measured in the same run (absolute milliseconds on a
shared machine are noise); GPU latency against absolute per-device budgets, or the ratio fallback for a GPU
without an entry. Every budget key is optional per variant; an unknown key is an error (a typo would
otherwise switch a gate off silently).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from compression.models import read_json

SCHEMA_VERSION = 1
VARIANT_KEYS = ("min_accuracy", "max_accuracy_drop", "max_flips", "max_size_mb", "max_latency_ratio")
ACCEPT_HINT = "compress baselines --accept RESULTS"


@dataclass(frozen=True)
class Finding:
    """One budget checked: passes when `ok`."""

    variant: str
    metric: str
    budget: float
    value: float | None  # None: the variant or figure is missing from the run
    ok: bool
    comparison: str  # ">=" or "<="

    def line(self) -> str:
        shown = "missing" if self.value is None else f"{self.value:g}"
        verdict = "ok" if self.ok else "FAIL"
        return f"{verdict}: {self.variant} {self.metric} = {shown} (budget {self.comparison} {self.budget:g})"


def load_baselines(path: str | Path) -> dict:
    """Read and validate baselines.json; ValueError naming the file and the key on anything malformed."""
    path = Path(path)
    data = read_json(path)
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: key 'schema_version' must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    profiles = data.get("profiles")
    if not isinstance(profiles, dict):
        raise ValueError(f"{path}: key 'profiles' must be an object of profile name -> variants")
    for profile, variants in profiles.items():
        if not isinstance(variants, dict):
            raise ValueError(f"{path}: key 'profiles.{profile}' must be an object of variant -> budgets")
        for variant, budgets in variants.items():
            where = f"profiles.{profile}.{variant}"
            if not isinstance(budgets, dict):
                raise ValueError(f"{path}: key '{where}' must be an object of budgets")
            for key, value in budgets.items():
                if key not in VARIANT_KEYS:
                    raise ValueError(f"{path}: key '{where}.{key}' is not a budget ({', '.join(VARIANT_KEYS)})")
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"{path}: key '{where}.{key}' must be a number, got {value!r}")
    gpu = data.get("gpu", {})
    if not isinstance(gpu, dict):
        raise ValueError(f"{path}: key 'gpu' must be an object")
    for section in ("latency_ms", "latency_ratio"):
        table = gpu.get(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"{path}: key 'gpu.{section}' must be an object")
        rows = table.values() if section == "latency_ms" else [table]
        for row in rows:
            if not isinstance(row, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values()
            ):
                raise ValueError(f"{path}: key 'gpu.{section}' must map variants to numbers")
    return data


def validate_results(results: dict, path: str | Path) -> dict:
    """A results.json from `compress run`, checked for what the gate reads; ValueError naming file and key."""
    for key in ("profile", "variants"):
        if key not in results:
            raise ValueError(f"{path}: key {key!r} missing (not a results.json from compress run)")
    if not isinstance(results["variants"], list):
        raise ValueError(f"{path}: key 'variants' must be a list")
    for i, row in enumerate(results["variants"]):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise ValueError(f"{path}: key 'variants[{i}].name' missing")
        for key in ("val_accuracy", "size_mb", "flips"):
            if not isinstance(row.get(key), (int, float)) or isinstance(row.get(key), bool):
                raise ValueError(f"{path}: key 'variants[{i}].{key}' missing or not a number")
        median = row.get("latency_ms", {}).get("median") if isinstance(row.get("latency_ms"), dict) else None
        if not isinstance(median, (int, float)):
            raise ValueError(f"{path}: key 'variants[{i}].latency_ms.median' missing or not a number")
    return results


def check(results: dict, baselines: dict, only: set[str] | None = None) -> list[Finding]:
    """Every budget of the run's profile (and GPU, if the run was on one) checked against `results`.

    `only` restricts the check to those variants (the benchmarks check one variant per test).
    """
    profile = results.get("profile")
    budgets = baselines["profiles"].get(profile)
    if budgets is None:
        raise ValueError(f"baselines have no profile {profile!r} (have: {', '.join(baselines['profiles'])})")
    rows = {v["name"]: v for v in results["variants"]}
    teacher = rows.get("teacher")
    gpu_name = results.get("environment", {}).get("gpu")
    findings: list[Finding] = []

    def add(variant, metric, budget, value, upper: bool):
        ok = value is not None and (value <= budget if upper else value >= budget)
        findings.append(Finding(variant, metric, budget, value, ok, "<=" if upper else ">="))

    for name, b in budgets.items():
        if only is not None and name not in only:
            continue
        row = rows.get(name)
        if row is None:
            add(name, "present", 1, None, upper=False)
            continue
        if "min_accuracy" in b:
            add(name, "val_accuracy", b["min_accuracy"], row["val_accuracy"], upper=False)
        if "max_accuracy_drop" in b and teacher is not None:
            drop = round(teacher["val_accuracy"] - row["val_accuracy"], 2)
            add(name, "accuracy_drop", b["max_accuracy_drop"], drop, upper=True)
        if "max_flips" in b:
            add(name, "flips", b["max_flips"], row.get("flips"), upper=True)
        if "max_size_mb" in b:
            add(name, "size_mb", b["max_size_mb"], row["size_mb"], upper=True)
        if "max_latency_ratio" in b and teacher is not None and not gpu_name:
            add(name, "latency_ratio", b["max_latency_ratio"], latency_ratio(row, teacher), upper=True)
    if gpu_name:
        findings += [f for f in _gpu_findings(rows, baselines.get("gpu", {}), gpu_name)
                     if only is None or f.variant in only]
    return findings


def latency_ratio(row: dict, teacher: dict) -> float:
    """The row's paired ratio to the teacher when measured (interleaved timing), else the ratio of medians."""
    if isinstance(row.get("latency_ratio"), (int, float)):
        return round(row["latency_ratio"], 3)
    return round(row["latency_ms"]["median"] / teacher["latency_ms"]["median"], 3)


def _gpu_findings(rows: dict, gpu: dict, gpu_name: str) -> list[Finding]:
    absolute = gpu.get("latency_ms", {}).get(gpu_name)
    out = []
    if absolute is not None:
        for name, budget in absolute.items():
            value = rows[name]["latency_ms"]["median"] if name in rows else None
            out.append(Finding(name, f"latency_ms[{gpu_name}]", budget, value,
                               value is not None and value <= budget, "<="))
        return out
    teacher = rows.get("teacher")
    for name, budget in gpu.get("latency_ratio", {}).items():
        value = latency_ratio(rows[name], teacher) if name in rows and teacher else None
        out.append(Finding(name, "latency_ratio (unknown GPU)", budget, value,
                           value is not None and value <= budget, "<="))
    return out


def failure_message(f: Finding, results_hint: str = "RESULTS") -> str:
    """One line: variant, metric, budget, value, and how to accept a new baseline."""
    shown = "missing" if f.value is None else f"{f.value:g}"
    return (
        f"{f.variant}: {f.metric} {shown} breaks its budget ({f.comparison} {f.budget:g}); "
        f"if intended, accept a new baseline: {ACCEPT_HINT.replace('RESULTS', results_hint)}"
    )


# --- accepting a run as the new baseline -----------------------------------------------------------------

# Slack added to what a run measured. Accuracy and flips are deterministic on one machine (seeded training,
# fixed threads), so a few sentences of slack covers other CPUs; latency ratios wander a few percent between
# reruns, and an injected 25% slowdown must still fail.
ACCURACY_SLACK = 0.6  # points (about 5 of 872 sentences)
FLIP_SLACK = 4
SIZE_SLACK = 1.02
LATENCY_SLACK = 1.15


def budgets_from(runs: list[dict]) -> dict:
    """Budgets for every variant, from one or more runs of the same profile, with the slack above.

    Accuracy and flips take the worst run (they are deterministic on one machine, so normally all agree);
    latency ratios take the median run, since on a shared machine single runs wander by 10% or more.
    """
    tables = [{v["name"]: v for v in r["variants"]} for r in runs]
    for rows in tables:
        if "teacher" not in rows:
            raise ValueError("cannot accept a run without a 'teacher' variant: every budget is relative to it")
    out = {}
    for name in tables[0]:
        rows = [t[name] for t in tables if name in t]
        worst_acc = min(r["val_accuracy"] for r in rows)
        worst_drop = max(t["teacher"]["val_accuracy"] - t[name]["val_accuracy"] for t in tables if name in t)
        b = {
            "min_accuracy": round(worst_acc - ACCURACY_SLACK, 2),
            "max_accuracy_drop": round(max(0.0, worst_drop) + ACCURACY_SLACK, 2),
            "max_flips": int(max(r["flips"] for r in rows)) + FLIP_SLACK,
            "max_size_mb": round(max(r["size_mb"] for r in rows) * SIZE_SLACK, 2),
        }
        if name != "teacher":
            ratio = statistics.median(latency_ratio(t[name], t["teacher"]) for t in tables if name in t)
            b["max_latency_ratio"] = round(ratio * LATENCY_SLACK, 3)
        out[name] = b
    return out


def accept(runs: list[dict], baselines: dict) -> tuple[dict, list[str]]:
    """New baselines with the runs' profile replaced by `budgets_from(runs)`, and the changes as lines."""
    if any(r.get("environment", {}).get("gpu") for r in runs):
        raise ValueError("accepting a GPU run is not supported: CPU budgets are ratios measured on the CPU")
    profiles = {r["profile"] for r in runs}
    if len(profiles) != 1:
        raise ValueError(f"runs of different profiles cannot be accepted together: {', '.join(sorted(profiles))}")
    profile = profiles.pop()
    new = json.loads(json.dumps(baselines))
    old = new["profiles"].get(profile, {})
    fresh = budgets_from(runs)
    changes = []
    for variant in sorted(set(old) | set(fresh)):
        for key in VARIANT_KEYS:
            before, after = old.get(variant, {}).get(key), fresh.get(variant, {}).get(key)
            if before != after:
                changes.append(f"{profile}.{variant}.{key}: {before} -> {after}")
    new["profiles"][profile] = fresh
    return new, changes
