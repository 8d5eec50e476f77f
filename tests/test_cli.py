"""compression.cli: exit codes (0 ok, 1 breach, 2 bad input), one-line errors, and the check/accept round trip.

Nothing here trains or loads a model: `run` is only exercised on inputs it must reject before doing any work, and
(in a subprocess) with its job replaced by a long fake build, to be stopped by SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import compression.pipeline  # noqa: F401  (imported up front so its import-time warnings are not in capsys)
from compression import cli
from compression.cli import EXIT_BREACH, EXIT_ERROR, main
from compression.schema import GPU_VARIANTS, VARIANTS, Results, VariantRow

ROOT = Path(__file__).resolve().parents[1]


def row(name, acc, flips, size, median) -> VariantRow:
    return VariantRow(
        name=name, parameters=1_000_000, size_mb=size, val_accuracy=acc, flips=flips,
        latency_ms={"median": median, "p90": median * 1.5, "samples": 300}, throughput_per_s=50.0,
        backend="pytorch fp32", build_seconds=0.0,
    )


def results_doc(**changes) -> dict:
    """A valid results.json document (built through the schema), then `changes` per variant (maybe invalid)."""
    results = Results(
        schema_version=1, profile="smoke", base="tiny", data="sst2", pooling="mean",
        environment={"device": "cpu", "gpu": None, "cpu": "Test CPU", "threads": 2, "python": "3.11.0",
                     "torch": "2.4.0", "transformers": "5.0.0", "onnxruntime": "1.20.0", "bitsandbytes": None},
        stages_seconds={"teacher": 1.0}, total_seconds=2.0,
        variants=[row("teacher", 90.0, 0, 86.65, 10.0), row("student", 88.8, 40, 43.2, 5.0),
                  row("student_int8", 88.4, 52, 11.3, 2.0)],
    )
    doc = results.model_dump(mode="json")
    for v in doc["variants"]:
        v.update(changes.get(v["name"], {}))
    return doc


def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def stderr_lines(captured) -> list[str]:
    return [line for line in captured.err.splitlines() if line.strip()]


@pytest.fixture
def accepted(tmp_path, capsys):
    """results.json and a baselines.json accepted from it."""
    results = write_json(tmp_path / "results.json", results_doc())
    baselines = tmp_path / "baselines.json"
    assert main(["baselines", "--accept", str(results), "--baselines", str(baselines)]) == 0
    capsys.readouterr()
    return results, baselines


# --- run: bad input is exit 2 and one line -----------------------------------------------------------------


def test_run_missing_data_dir(capsys):
    assert main(["run", "--data", "/no/such/dir"]) == EXIT_ERROR
    captured = capsys.readouterr()
    lines = stderr_lines(captured)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("compress run: error: ")
    assert "/no/such/dir" in lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_run_missing_data_dir_subprocess(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COMPRESSION_CACHE": str(tmp_path / "c")}
    proc = subprocess.run(
        [sys.executable, "-m", "compression.cli", "run", "--data", "/no/such/dir", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    # Third-party import warnings (e.g. a broken optional torchao build) may precede it; the tool's own
    # output is exactly one line, and it is the last one.
    ours = [line for line in proc.stderr.splitlines() if line.startswith("compress ")]
    assert len(ours) == 1 and ours[0] == proc.stderr.rstrip("\n").splitlines()[-1]
    assert ours[0].startswith("compress run: error: /no/such/dir")
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()
    assert proc.stdout == ""


@pytest.mark.parametrize("threads", ["0", "-3", "99999999999999999999"])
def test_run_threads_out_of_range(capsys, sst2_dir, threads):
    assert main(["run", "--threads", threads, "--data", str(sst2_dir)]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert line == f"compress run: error: --threads must be 1-1024, got {threads}"


@pytest.mark.parametrize("option", ["--base", "--teacher"])
def test_run_empty_model_name_is_refused_not_the_default(capsys, sst2_dir, option):
    # argparse's usage error (exit 2), before anything loads: an empty name is not "the profile's default"
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--profile", "smoke", option, " ", "--data", str(sst2_dir)])
    assert exit_.value.code == EXIT_ERROR
    assert f"{option}: must name a model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["run", "--out", ""], "--out"),
    (["run", "--cache", " "], "--cache"),
    (["check", ""], "results"),
    (["check", "r.json", "--baselines", ""], "--baselines"),
    (["baselines", "--accept", ""], "--accept"),
    (["export", "--folder", "f", "--out", ""], "--out"),
    (["predict", "", "text"], "folder"),
])
def test_an_empty_path_is_refused_not_the_current_folder(capsys, tmp_path, monkeypatch, argv, option):
    """Path("") is ".": an unset variable in `--out "$OUT"` would otherwise write into the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert f"{option}: must name a file or folder, got an empty string" in line
    assert list(tmp_path.iterdir()) == []


def test_an_empty_data_folder_is_refused_not_the_current_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--data", ""])
    assert exit_.value.code == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert "--data: must name an SST-2 folder, got an empty string" in line


def test_a_tilde_in_an_option_the_shell_left_alone_is_the_home_folder(capsys, tmp_path, monkeypatch):
    # `--out=~/x` reaches compress unexpanded: it means $HOME/x, not a folder named "~" here
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--baselines=~/b.json", "~/r.json"]) == EXIT_ERROR
    assert f"{tmp_path / 'home' / 'r.json'}: no such file" in capsys.readouterr().err


def test_run_hub_id_not_to_be_had_is_one_line_naming_it(capsys, sst2_dir, tmp_path, monkeypatch):
    # the build worker is a fresh process: it finds the (empty) Hugging Face cache through the environment
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--profile", "smoke", "--base", "org/absent", "--data", str(sst2_dir),
                 "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert code == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert line == ("compress run: error: org/absent: not in the local Hugging Face cache, and the hub cannot be "
                    "reached (offline, or HF_HUB_OFFLINE is set)")
    assert not (tmp_path / "out").exists()


def test_run_out_is_a_file(capsys, sst2_dir, tmp_path):
    out = tmp_path / "results"
    out.write_text("not a folder")
    assert main(["run", "--data", str(sst2_dir), "--out", str(out)]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert str(out) in line and "not a folder" in line


def test_run_data_from_env_missing(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SST2_DIR", str(tmp_path / "gone"))
    assert main(["run"]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert str(tmp_path / "gone") in line


def test_run_unknown_pooling_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--pooling", "max"])
    assert exc.value.code == 2
    assert "max" in capsys.readouterr().err


def test_run_unknown_profile_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--profile", "huge"])
    assert exc.value.code == 2
    assert "huge" in capsys.readouterr().err


def test_no_command_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


@pytest.mark.parametrize(("argv", "named"), [
    ([], "command"),
    (["run", "--pooling", "max"], "--pooling"),
    (["run", "--threads"], "--threads"),
    (["run", "--bogus", "1"], "--bogus"),
    (["check"], "results"),
    (["export", "--folder", "x"], "--out"),
    (["predict"], "folder"),
])
def test_usage_errors_are_one_line(capsys, argv, named):
    # one line naming the option, like every other error; the usage itself is --help's
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert line.startswith("compress") and ": error: " in line and named in line and "--help" in line


# --- check -------------------------------------------------------------------------------------------------


def test_check_missing_results_file(capsys, tmp_path, accepted):
    _, baselines = accepted
    missing = tmp_path / "nowhere" / "results.json"
    assert main(["check", str(missing), "--baselines", str(baselines)]) == EXIT_ERROR
    captured = capsys.readouterr()
    (line,) = stderr_lines(captured)
    assert line.startswith("compress check: error: ") and str(missing) in line
    assert "Traceback" not in captured.err


def test_check_missing_default_baselines(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "results.json", results_doc())
    assert main(["check", "results.json"]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert "baselines.json" in line and "no such file" in line


def test_check_baselines_with_unknown_key(capsys, tmp_path, accepted):
    results, baselines = accepted
    doc = json.loads(baselines.read_text())
    doc["profiles"]["smoke"]["student"]["max_acuracy"] = 90
    write_json(baselines, doc)
    assert main(["check", str(results), "--baselines", str(baselines)]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert str(baselines) in line
    assert "profiles.smoke.student.max_acuracy" in line


def test_check_passing_run(capsys, accepted):
    results, baselines = accepted
    assert main(["check", str(results), "--baselines", str(baselines)]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    # 3 variants x (accuracy, drop, flips, size) + 2 latency ratios
    assert out[-1] == "14 passed, 0 failed"
    assert "| variant" in out[0]
    assert sum("| pass |" in line for line in out) == 14
    assert stderr_lines(captured) == []


def test_check_breaching_run(capsys, tmp_path, accepted):
    _, baselines = accepted
    worse = write_json(tmp_path / "worse.json", results_doc(student_int8={"val_accuracy": 85.4}))
    assert main(["check", str(worse), "--baselines", str(baselines)]) == EXIT_BREACH
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == "12 passed, 2 failed"
    assert sum("| FAIL |" in line for line in captured.out.splitlines()) == 2
    lines = stderr_lines(captured)
    assert len(lines) == 2
    assert all(line.startswith("student_int8: ") for line in lines)
    assert any("val_accuracy 85.4" in line for line in lines)
    assert any("accuracy_drop 4.6" in line for line in lines)
    assert all(f"compress baselines --accept {worse}" in line for line in lines)


def test_check_results_missing_variants(capsys, tmp_path, accepted):
    _, baselines = accepted
    doc = results_doc()
    del doc["variants"]
    bad = write_json(tmp_path / "bad.json", doc)
    assert main(["check", str(bad), "--baselines", str(baselines)]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert str(bad) in line and "'variants'" in line


def test_check_results_variant_missing_a_figure(capsys, tmp_path, accepted):
    _, baselines = accepted
    doc = results_doc()
    del doc["variants"][1]["size_mb"]
    bad = write_json(tmp_path / "bad.json", doc)
    assert main(["check", str(bad), "--baselines", str(baselines)]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert str(bad) in line and "size_mb" in line


def test_check_results_not_json(capsys, tmp_path, accepted):
    _, baselines = accepted
    bad = tmp_path / "results.json"
    bad.write_text("{truncated")
    assert main(["check", str(bad), "--baselines", str(baselines)]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert str(bad) in line and "not valid JSON" in line


# --- baselines --accept ------------------------------------------------------------------------------------


def test_accept_creates_baselines_then_check_passes(capsys, tmp_path):
    results = write_json(tmp_path / "results.json", results_doc())
    new = tmp_path / "sub" / "new.json"
    assert main(["baselines", "--accept", str(results), "--baselines", str(new)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert new.is_file()
    doc = json.loads(new.read_text())
    assert doc["schema_version"] == 1
    assert set(doc["profiles"]["smoke"]) == {"teacher", "student", "student_int8"}
    assert "smoke.student_int8.max_flips: None -> 56" in out
    assert "smoke.teacher.min_accuracy: None -> 89.4" in out
    assert out[-1] == f"wrote {new}"
    assert len(out) == 3 * 4 + 2 + 1  # one line per new budget, then "wrote"

    assert main(["check", str(results), "--baselines", str(new)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "14 passed, 0 failed"

    # accepting the same run again changes nothing
    assert main(["baselines", "--accept", str(results), "--baselines", str(new)]) == 0
    assert capsys.readouterr().out.splitlines() == ["no change", f"wrote {new}"]
    assert [p.name for p in new.parent.iterdir()] == ["new.json"]  # no temporary files left


def test_accept_a_regression_then_it_passes(capsys, tmp_path, accepted):
    _, baselines = accepted
    worse = write_json(tmp_path / "worse.json", results_doc(student={"flips": 80}))
    assert main(["check", str(worse), "--baselines", str(baselines)]) == EXIT_BREACH
    assert main(["baselines", "--accept", str(worse), "--baselines", str(baselines)]) == 0
    assert "smoke.student.max_flips: 44 -> 84" in capsys.readouterr().out.splitlines()
    assert main(["check", str(worse), "--baselines", str(baselines)]) == 0


def test_accept_malformed_results(capsys, tmp_path):
    doc = results_doc()
    del doc["variants"]
    bad = write_json(tmp_path / "results.json", doc)
    target = tmp_path / "baselines.json"
    assert main(["baselines", "--accept", str(bad), "--baselines", str(target)]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert line.startswith("compress baselines: error: ") and "'variants'" in line and str(bad) in line
    assert not target.exists()


def test_accept_gpu_run_writes_that_cards_budgets(capsys, tmp_path):
    cpu = write_json(tmp_path / "cpu.json", results_doc())
    target = tmp_path / "baselines.json"
    assert main(["baselines", "--accept", str(cpu), "--baselines", str(target)]) == 0
    profiles = json.loads(target.read_text())["profiles"]
    doc = results_doc()
    doc["environment"]["gpu"] = "Tesla T4"
    for r in doc["variants"]:
        r["backend"] = "onnxruntime-int8" if r["name"].endswith("_int8") else "pytorch-fp32 (cuda) + CUDA graphs"
    gpu = write_json(tmp_path / "gpu.json", doc)
    capsys.readouterr()
    assert main(["baselines", "--accept", str(gpu), "--baselines", str(target)]) == 0
    out = capsys.readouterr().out
    written = json.loads(target.read_text())
    assert written["profiles"] == profiles  # accuracy and size stay gated from the CPU run
    assert set(written["gpu"]["smoke"]["latency_ms"]["Tesla T4"]) == {r["name"] for r in doc["variants"]} - {
        "student_int8"}
    assert "gpu.smoke.latency_ms[Tesla T4].teacher: None -> " in out and f"wrote {target}" in out
    # a CPU run and a GPU run together are refused in one line, and the file is left as it was
    before = target.read_bytes()
    assert main(["baselines", "--accept", str(cpu), str(gpu), "--baselines", str(target)]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert "GPU and CPU runs" in line and target.read_bytes() == before


def test_accept_into_invalid_existing_baselines(capsys, tmp_path):
    results = write_json(tmp_path / "results.json", results_doc())
    target = write_json(tmp_path / "baselines.json", {"schema_version": 7, "profiles": {}})
    assert main(["baselines", "--accept", str(results), "--baselines", str(target)]) == EXIT_ERROR
    (line,) = stderr_lines(capsys.readouterr())
    assert str(target) in line and "schema_version" in line
    assert json.loads(target.read_text()) == {"schema_version": 7, "profiles": {}}  # untouched


# --- malformed documents: exit 2, one line naming the file and the key, never a traceback or a pass --------


def one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    (line,) = stderr_lines(captured)
    assert line.startswith(f"compress {command}: error: ")
    return line


def set_in(doc: dict, dotted: str, value) -> dict:
    *path, last = dotted.split(".")
    target = doc
    for part in path:
        target = target[int(part)] if isinstance(target, list) else target[part]
    target[last] = value
    return doc


# (what to set in the accepted baselines.json, the key the error names, written as raw JSON text)
BAD_BASELINES = [
    ("profiles.smoke", "[]", "profiles.smoke"),
    ("profiles.smoke", "{}", "profiles.smoke"),
    ("profiles.smoke.student", "{}", "profiles.smoke.student"),
    ("profiles.smoke.teacher.max_size_mb", "Infinity", "profiles.smoke.teacher.max_size_mb"),
    ("profiles.smoke.teacher.max_size_mb", "1e999", "profiles.smoke.teacher.max_size_mb"),
    ("profiles.smoke.teacher.min_accuracy", "-50", "profiles.smoke.teacher.min_accuracy"),
    ("profiles.smoke.teacher.min_accuracy", "NaN", "profiles.smoke.teacher.min_accuracy"),
    ("profiles.smoke.student.max_flips", "-1", "profiles.smoke.student.max_flips"),
    ("profiles.smoke.student.max_latency_ratio", "0", "profiles.smoke.student.max_latency_ratio"),
    ("profiles.smoke.student.max_accuracy_drop", "-Infinity", "profiles.smoke.student.max_accuracy_drop"),
    ("gpu", '{"smoke": {"latency_ms": {"Tesla T4": {"student": 0}}}}', "gpu.smoke.latency_ms.Tesla T4.student"),
    ("gpu", '{"smoke": {"latency_ratio": {"distilled": 0.5}}}', "gpu.smoke.latency_ratio.distilled"),
    ("gpu", '{"latency_ratio": {"student": 0.5}}', "gpu"),  # the first layout, one block for every profile
]


def write_raw(path: Path, doc: dict, dotted: str, raw: str) -> Path:
    """`doc` with the value at `dotted` replaced by the JSON text `raw` (which json.dumps could not write)."""
    path.write_text(json.dumps(set_in(doc, dotted, "@RAW@")).replace('"@RAW@"', raw))
    return path


@pytest.mark.parametrize(("dotted", "raw", "key"), BAD_BASELINES)
def test_check_malformed_baselines(capsys, accepted, dotted, raw, key):
    results, baselines = accepted
    write_raw(baselines, json.loads(baselines.read_text()), dotted, raw)
    assert main(["check", str(results), "--baselines", str(baselines)]) == EXIT_ERROR
    line = one_error_line(capsys, "check")
    assert line.startswith(f"compress check: error: {baselines}: key '{key}': ")


def test_check_refuses_a_budget_given_twice(capsys, accepted):
    """A second "max_flips" in one variant's budgets would replace the first and switch that gate off."""
    results, baselines = accepted
    doc = json.loads(baselines.read_text())
    flips = doc["profiles"]["smoke"]["student"]["max_flips"]
    text = json.dumps(doc).replace(f'"max_flips": {flips}', f'"max_flips": {flips}, "max_flips": 100000', 1)
    baselines.write_text(text)
    assert text.count('"max_flips": 100000') == 1
    assert main(["check", str(results), "--baselines", str(baselines)]) == EXIT_ERROR
    line = one_error_line(capsys, "check")
    assert line == f"compress check: error: {baselines}: key 'max_flips' appears twice in one object"


BAD_RESULTS = [
    ("profile", '["smoke"]', "profile"),
    ("environment", '"cpu"', "environment"),
    ("variants.0.latency_ms.median", "0", "variants[0].latency_ms.median"),
    ("variants.0.val_accuracy", "NaN", "variants[0].val_accuracy"),
    ("variants.1.size_mb", "Infinity", "variants[1].size_mb"),
    ("variants.1.flips", "-5", "variants[1].flips"),
    ("variants.1.flips", "2.5", "variants[1].flips"),
    ("variants.2.val_accuracy", "150", "variants[2].val_accuracy"),
    ("variants.2.name", '"student"', "variants"),
    ("variants.2.name", '"distilled"', "variants[2].name"),
    ("variants.2.latency_ratio", '"fast"', "variants[2].latency_ratio"),
    ("total_seconds", "-1", "total_seconds"),
]


@pytest.mark.parametrize(("dotted", "raw", "key"), BAD_RESULTS)
def test_check_malformed_results(capsys, tmp_path, accepted, dotted, raw, key):
    _, baselines = accepted
    bad = write_raw(tmp_path / "bad.json", results_doc(), dotted, raw)
    assert main(["check", str(bad), "--baselines", str(baselines)]) == EXIT_ERROR
    line = one_error_line(capsys, "check")
    assert line.startswith(f"compress check: error: {bad}: key '{key}': ")
    assert capsys.readouterr().out == ""  # no table: nothing was gated


def test_check_results_sharing_no_variant_with_the_profile(capsys, tmp_path, accepted):
    _, baselines = accepted
    doc = results_doc()
    for v, name in zip(doc["variants"], ("teacher_bnb8", "pruned_student", "pruned_student_int8")):
        v["name"] = name
    other = write_json(tmp_path / "other.json", doc)
    assert main(["check", str(other), "--baselines", str(baselines)]) == EXIT_ERROR
    line = one_error_line(capsys, "check")
    assert str(other) in line and str(baselines) in line and "shares no variant" in line
    assert "run: teacher_bnb8, pruned_student, pruned_student_int8" in line
    assert "baselines: teacher, student, student_int8" in line


def test_check_variant_without_budgets_is_a_visible_note(capsys, tmp_path, accepted):
    _, baselines = accepted
    doc = results_doc()
    doc["variants"].append(row("student_bnb8", 88.0, 41, 30.0, 20.0).model_dump(mode="json"))
    extra = write_json(tmp_path / "extra.json", doc)
    assert main(["check", str(extra), "--baselines", str(baselines)]) == 0
    captured = capsys.readouterr()
    (note,) = stderr_lines(captured)
    assert note.startswith("note: student_bnb8 is not gated: ") and f"--accept {extra}" in note
    assert captured.out.splitlines()[-1] == "14 passed, 0 failed, 1 not gated (student_bnb8)"


def test_check_gpu_run_without_gpu_budgets_names_each_ungated_latency(capsys, tmp_path, accepted):
    """A run on a card that baselines.json has no latency budget for: accuracy and size are still gated (the
    profile's budgets), and each row's latency is named as not gated on that card, with how to gate it."""
    _, baselines = accepted  # accepted from a CPU run: no GPU entry, no ratio fallback
    doc = results_doc()
    doc["environment"].update(device="cuda", gpu="NVIDIA L4")
    run = write_json(tmp_path / "l4.json", doc)
    assert main(["check", str(run), "--baselines", str(baselines)]) == 0
    captured = capsys.readouterr()
    notes = stderr_lines(captured)
    assert [n.split("'s latency")[0] for n in notes] == ["note: teacher", "note: student", "note: student_int8"]
    assert all("not gated on NVIDIA L4" in n and f"--accept {run}" in n for n in notes)
    assert captured.out.splitlines()[-1] == (  # 12: the CPU run's two latency ratios do not apply on a GPU
        "12 passed, 0 failed, 3 latency not gated on this GPU (teacher, student, student_int8)")


def test_check_gpu_run_notes_the_rows_that_ran_on_the_cpu(capsys, tmp_path, accepted):
    _, baselines = accepted
    doc = results_doc(student_int8={"backend": "onnxruntime int8 (cpu)"})
    doc["environment"].update(device="cuda", gpu="NVIDIA L4")
    run = write_json(tmp_path / "l4.json", doc)
    assert main(["check", str(run), "--baselines", str(baselines)]) == 0
    captured = capsys.readouterr()
    (note,) = [n for n in stderr_lines(captured) if "ran on the CPU" in n]
    assert note.startswith("note: student_int8 ran on the CPU beside a teacher on NVIDIA L4")
    assert captured.out.splitlines()[-1] == (
        "12 passed, 0 failed, 2 latency not gated on this GPU (teacher, student), "
        "1 latency gated by CPU runs only (student_int8)")


def test_check_missing_budgeted_variant_is_a_breach(capsys, tmp_path, accepted):
    _, baselines = accepted
    doc = results_doc()
    doc["variants"] = [v for v in doc["variants"] if v["name"] != "student"]
    fewer = write_json(tmp_path / "fewer.json", doc)
    assert main(["check", str(fewer), "--baselines", str(baselines)]) == EXIT_BREACH
    captured = capsys.readouterr()
    (line,) = stderr_lines(captured)
    assert line.startswith("student: present missing breaks its budget")
    assert captured.out.splitlines()[-1] == "9 passed, 1 failed"  # teacher 4, student_int8 5


# --- baselines --accept: impossible figures refused, strict JSON written, nothing damaged --------------------


@pytest.mark.parametrize(
    ("dotted", "raw", "key"),
    [
        ("variants.1.val_accuracy", "NaN", "variants[1].val_accuracy"),
        ("variants.1.size_mb", "Infinity", "variants[1].size_mb"),
        ("variants.1.flips", "-5", "variants[1].flips"),
        ("variants.1.val_accuracy", "150", "variants[1].val_accuracy"),
        ("variants.0.latency_ms.median", "0", "variants[0].latency_ms.median"),
    ],
)
def test_accept_refuses_impossible_figures(capsys, tmp_path, accepted, dotted, raw, key):
    _, baselines = accepted
    before = baselines.read_bytes()
    bad = write_raw(tmp_path / "bad.json", results_doc(), dotted, raw)
    assert main(["baselines", "--accept", str(bad), "--baselines", str(baselines)]) == EXIT_ERROR
    line = one_error_line(capsys, "baselines")
    assert line.startswith(f"compress baselines: error: {bad}: key '{key}': ")
    assert baselines.read_bytes() == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "baselines.json", "results.json"]


def test_accept_with_one_bad_run_of_several_writes_nothing(capsys, tmp_path):
    good = write_json(tmp_path / "good.json", results_doc())
    bad = write_raw(tmp_path / "bad.json", results_doc(), "variants.2.size_mb", "NaN")
    target = tmp_path / "baselines.json"
    assert main(["baselines", "--accept", str(good), str(bad), "--baselines", str(target)]) == EXIT_ERROR
    assert str(bad) in one_error_line(capsys, "baselines")
    assert not target.exists()


def test_accept_writes_strict_json(capsys, accepted):
    _, baselines = accepted

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    doc = json.loads(baselines.read_text(), parse_constant=refuse)
    assert set(doc["profiles"]["smoke"]["student"]) == {
        "min_accuracy", "max_accuracy_drop", "max_flips", "max_size_mb", "max_latency_ratio"}
    assert "null" not in baselines.read_text()  # budgets left out stay out


# --- schema ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("document", ["results", "baselines"])
def test_schema_prints_the_json_schema(capsys, document):
    assert main(["schema", document]) == 0
    captured = capsys.readouterr()
    published = json.loads(captured.out)
    assert published["title"] == document.capitalize()
    assert published["additionalProperties"] is False
    assert "schema_version" in published["required"]
    assert stderr_lines(captured) == []


def test_schema_of_results_declares_the_row_and_the_variants(capsys):
    assert main(["schema", "results"]) == 0
    defs = json.loads(capsys.readouterr().out)["$defs"]
    row_schema = defs["VariantRow"]
    assert row_schema["properties"]["name"]["enum"] == [*VARIANTS, *GPU_VARIANTS]
    assert {"val_accuracy_batched", "e2e_latency_ms", "folder"} <= set(row_schema["properties"])
    assert "val_accuracy_batched" not in row_schema["required"] and "flips" in row_schema["required"]
    assert row_schema["properties"]["val_accuracy"]["maximum"] == 100


def test_a_closed_stdout_ends_quietly_with_sigpipes_status(capsys, monkeypatch, tmp_path):
    """`compress ... | head`: the reader going away is not bad input (no "error", no exit 2)."""
    sink = open(tmp_path / "sink", "w")

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sink.fileno()

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["schema", "results"]) == 128 + signal.SIGPIPE
    sink.close()
    assert capsys.readouterr().err == ""


def test_schema_unknown_document_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["schema", "budgets"])
    assert exc.value.code == 2
    assert "budgets" in capsys.readouterr().err


def test_exit_codes():
    assert (cli.EXIT_BREACH, cli.EXIT_ERROR, cli.EXIT_FAILED) == (1, 2, 3)


def test_a_dead_worker_is_a_failure_not_bad_input(capsys, monkeypatch, sst2_dir):
    def died(*args):
        raise ChildProcessError("the worker process running build_run died without an answer (exit code -9)")

    monkeypatch.setattr(cli, "cmd_run", died)
    assert main(["run", "--data", str(sst2_dir)]) == cli.EXIT_FAILED
    (line,) = stderr_lines(capsys.readouterr())
    assert line.startswith("compress run: failed: ") and "exit code -9" in line


# --- run: --out and --cache are checked before anything is loaded ----------------------------------------------


def run_rejected(capsys, *args) -> str:
    """`compress run ARGS` must fail at once with one line on stderr (and not load a model): that line."""
    start = time.perf_counter()
    assert main(["run", *args]) == EXIT_ERROR
    assert time.perf_counter() - start < 10  # no training, no model loading
    captured = capsys.readouterr()
    (line,) = stderr_lines(captured)
    assert line.startswith("compress run: error: ") and "Traceback" not in captured.err
    assert captured.out == ""
    return line


@pytest.fixture
def no_pipeline(monkeypatch):
    """Fail the test if the job itself starts."""
    def run(*args, **kwargs):
        raise AssertionError("the job started before its options were checked")

    monkeypatch.setattr(compression.pipeline, "run", run)


@pytest.mark.usefixtures("no_pipeline")
def test_run_out_under_a_file(capsys, sst2_dir, tmp_path):
    blocker = tmp_path / "results.json"
    blocker.write_text("{}")
    line = run_rejected(capsys, "--data", str(sst2_dir), "--out", str(blocker / "sub"), "--cache", str(tmp_path / "c"))
    assert line == f"compress run: error: --out {blocker / 'sub'}: {blocker} is a file, not a folder"
    assert blocker.read_text() == "{}" and not (tmp_path / "c").exists()  # nothing written, nothing damaged


@pytest.mark.usefixtures("no_pipeline")
def test_run_cache_is_a_file(capsys, sst2_dir, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("mine")
    line = run_rejected(capsys, "--data", str(sst2_dir), "--out", str(tmp_path / "out"), "--cache", str(blocker))
    assert line == f"compress run: error: --cache {blocker}: exists and is not a folder"
    assert blocker.read_text() == "mine" and not (tmp_path / "out").exists()


@pytest.mark.usefixtures("no_pipeline")
def test_run_cache_under_a_file(capsys, sst2_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    line = run_rejected(capsys, "--data", str(sst2_dir), "--out", str(tmp_path / "out"),
                        "--cache", str(blocker / "a" / "b"))
    assert line == f"compress run: error: --cache {blocker / 'a' / 'b'}: {blocker} is a file, not a folder"


@pytest.mark.usefixtures("no_pipeline")
def test_run_default_cache_from_the_environment_is_a_file(capsys, sst2_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("mine")
    monkeypatch.setenv("COMPRESSION_CACHE", str(blocker))
    line = run_rejected(capsys, "--data", str(sst2_dir), "--out", str(tmp_path / "out"))
    assert line == f"compress run: error: $COMPRESSION_CACHE {blocker}: exists and is not a folder"


@pytest.mark.usefixtures("no_pipeline")
@pytest.mark.parametrize("option", ["--out", "--cache"])
def test_run_folder_not_writable(capsys, sst2_dir, tmp_path, monkeypatch, option):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # (chmod cannot show this where tests run as root, who may write anywhere: os.access is what the check asks)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    folders = {"--out": str(tmp_path / "out"), "--cache": str(tmp_path / "c"), option: str(locked / "sub")}
    line = run_rejected(capsys, "--data", str(sst2_dir), *[x for kv in folders.items() for x in kv])
    assert line == f"compress run: error: {option} {locked / 'sub'}: not writable ({locked} is read-only for this user)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only folder")
@pytest.mark.usefixtures("no_pipeline")
def test_run_out_in_a_read_only_folder(capsys, sst2_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = run_rejected(capsys, "--data", str(sst2_dir), "--out", str(locked), "--cache", str(tmp_path / "c"))
    assert "--out" in line and "not writable (it is read-only" in line


@pytest.mark.usefixtures("no_pipeline")
def test_run_out_whose_results_file_is_a_folder(capsys, sst2_dir, tmp_path):
    (tmp_path / "out" / "results.json").mkdir(parents=True)
    line = run_rejected(capsys, "--data", str(sst2_dir), "--out", str(tmp_path / "out"),
                        "--cache", str(tmp_path / "c"))
    assert line == (f"compress run: error: --out {tmp_path / 'out'}: its results.json is a folder, where the run "
                    "writes a file")


@pytest.mark.usefixtures("no_pipeline")
@pytest.mark.parametrize("option", ["--out", "--cache"])
def test_run_folder_name_too_long_for_the_file_system(capsys, sst2_dir, tmp_path, option):
    long = tmp_path / ("x" * 300) / "sub"
    folders = {"--out": str(tmp_path / "out"), "--cache": str(tmp_path / "c"), option: str(long)}
    line = run_rejected(capsys, "--data", str(sst2_dir), *[x for kv in folders.items() for x in kv])
    assert line.startswith(f"compress run: error: {option} {long}: a name in it is longer than the ")
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_check_output_folder_accepts_a_new_or_existing_folder_and_creates_nothing(tmp_path):
    cli.check_output_folder("--out", tmp_path)
    cli.check_output_folder("--out", tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []


# --- run: SIGTERM and Ctrl-C --------------------------------------------------------------------------------------

# `compress run` with the job replaced by a long build in the worker, inside the cache, as the real job runs.
FAKE_RUN = """
import os, sys, time
from pathlib import Path
from compression import cache, cli
from compression.worker import run_in_child

def slow_build(folder):
    (folder / "half.bin").write_text("half")
    (Path(sys.argv[1]) / "child.pid").write_text(str(os.getpid()))
    time.sleep(120)

def job(root):
    cache.cached(Path(root), "teacher", "k", slow_build, lambda folder: None)

def fake_cmd_run(args):
    run_in_child(job, str(args.cache))
    raise AssertionError("unreachable")

if __name__ == "__main__":
    cli.cmd_run = fake_cmd_run
    sys.exit(cli.main(["-v", "run", "--cache", sys.argv[2]]))
"""


@pytest.mark.parametrize(("signum", "group", "code", "word"), [
    (signal.SIGTERM, False, 143, "terminated"),  # a cancelled CI job: the main process
    (signal.SIGTERM, True, 143, "terminated"),  # `timeout`: the whole process group
    (signal.SIGINT, True, 130, "interrupted"),  # Ctrl-C
    (signal.SIGINT, False, 130, "interrupted"),  # the main process alone: it stops the worker
])
def test_run_signal_stops_the_worker_and_leaves_no_temporary_folder(tmp_path, signum, group, code, word):
    from compression.tempdirs import pid_alive

    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    root = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(root)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            # a test run started as a background job inherits SIGINT ignored (as `&` does), and a
                            # Python started so keeps ignoring it: give the child what a terminal gives it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "child.pid").exists() and (tmp_path / "child.pid").read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        child = int((tmp_path / "child.pid").read_text())
        assert [p.name for p in root.iterdir() if p.name.startswith(".teacher-k-")]  # the build is under way
        if group:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == code, err
    assert err.splitlines()[-1] == (f"compress run: {word} (cached artifacts and results are written whole or not "
                                    "at all)")
    assert [line for line in err.splitlines() if line.startswith("compress ")] == [err.splitlines()[-1]]
    assert "Traceback" not in err and "leaked" not in err
    assert not pid_alive(child)
    assert sorted(p.name for p in root.iterdir()) == [".locks"]  # the temporary folder was removed


def test_sigterm_handler_is_restored_after_main(capsys):
    before = signal.getsignal(signal.SIGTERM)
    main(["check", "/no/such/results.json"])
    assert signal.getsignal(signal.SIGTERM) is before


def test_accepting_figures_that_overflow_a_budget_is_one_line_naming_the_run(capsys, tmp_path, accepted):
    _, baselines = accepted
    before = baselines.read_bytes()
    huge = write_json(tmp_path / "huge.json", results_doc(student={"size_mb": 1.79e308}))  # x1.02 is infinite
    assert main(["baselines", "--accept", str(huge), "--baselines", str(baselines)]) == EXIT_ERROR
    line = one_error_line(capsys, "baselines")
    assert f"{huge}: the budgets of student the runs give: key 'max_size_mb'" in line
    assert baselines.read_bytes() == before


def test_baselines_behind_a_symlink_are_written_through_it(capsys, tmp_path, accepted):
    results, baselines = accepted
    link = tmp_path / "link.json"
    link.symlink_to(baselines)
    other = write_json(tmp_path / "other.json", results_doc(student={"flips": 30}))
    assert main(["baselines", "--accept", str(other), "--baselines", str(link)]) == 0
    assert link.is_symlink() and "student" in json.loads(baselines.read_text())["profiles"]["smoke"]
    assert json.loads(baselines.read_text())["profiles"]["smoke"]["student"]["max_flips"] == 34  # the file it names
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    capsys.readouterr()
    assert main(["baselines", "--accept", str(results), "--baselines", str(tmp_path / "loop1")]) == EXIT_ERROR
    assert "loop1: cannot be resolved" in one_error_line(capsys, "baselines")
    assert (tmp_path / "loop1").is_symlink()  # not replaced by a file


def test_verbose_shows_where_an_error_was_raised_then_the_same_one_line(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    assert main(["check", str(missing)]) == EXIT_ERROR
    quiet = capsys.readouterr().err
    assert main(["-v", "check", str(missing)]) == EXIT_ERROR
    loud = capsys.readouterr().err
    assert "Traceback" not in quiet and "Traceback (most recent call last)" in loud
    assert loud.splitlines()[-1] == quiet.strip() == f"compress check: error: {missing}: no such file"
