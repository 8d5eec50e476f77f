"""compression.report: the results table, results.{json,md}, pareto.png, and atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from compression import report
from compression.report import REFERENCE, markdown, table, write_atomic, write_results

COLUMNS = ["#", "Parameters", "Size (MB)", "Val Acc (%)", "Latency (ms)", "p90 (ms)", "tokenize + forward (ms)",
           "Model", "Backend"]


def variant(name, parameters, size, acc, median, p90, backend="pytorch fp32"):
    return {
        "name": name, "parameters": parameters, "size_mb": size, "val_accuracy": acc, "flips": 0,
        "latency_ms": {"median": median, "p90": p90, "samples": 300}, "backend": backend,
    }


@pytest.fixture
def results():
    return {
        "schema_version": 1,
        "profile": "smoke",
        "base": "tiny",
        "data": "/data/sst2",
        "environment": {"device": "cpu", "gpu": None, "cpu": "Test CPU", "threads": 2},
        "variants": [
            variant("teacher", 22_713_602, 86.646, 90.1, 12.3456, 15.0),
            variant("student", 1_234_567, 43.3, 88.25, 6.0, 7.5),
            {**variant("student_int8", 1_234_567, 11.005, 87.9, 3.141, 4.0, backend="onnxruntime int8"),
             "val_accuracy_batched": 87.5, "e2e_latency_ms": {"median": 4.256, "p90": 5.0, "samples": 300}},
        ],
    }


def _cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|")
    return [c.strip() for c in line[1:-1].split("|")]


def test_table_columns_and_rows(results):
    lines = table(results["variants"]).splitlines()
    assert _cells(lines[0]) == COLUMNS
    assert _cells(lines[1]) == ["--:"] * 7 + [":--"] * 2
    assert len(lines) == 2 + 3
    assert _cells(lines[2]) == ["1", "22,713,602", "86.65", "90.10", "12.35", "15.00", "-", "teacher", "pytorch fp32"]
    assert _cells(lines[3]) == ["2", "1,234,567", "43.30", "88.25", "6.00", "7.50", "-", "student", "pytorch fp32"]
    # batch-1 accuracy first, the batched one beside it where it differs; end-to-end latency where measured
    assert _cells(lines[4]) == ["3", "1,234,567", "11.01", "87.90 (87.50 batched)", "3.14", "4.00", "4.26",
                                "student_int8", "onnxruntime int8"]


def test_table_reference_figures():
    rows = [variant(name, params, size, acc, lat, lat) for name, params, size, acc, lat in REFERENCE]
    lines = table(rows).splitlines()
    assert _cells(lines[2])[:5] == ["1", "109,483,778", "418.58", "92.55", "9.92"]
    assert _cells(lines[-1])[1] == "59,870,210"


def test_table_empty():
    assert len(table([]).splitlines()) == 2


def test_markdown_names_profile_base_data_and_machine(results):
    text = markdown(results)
    assert text.startswith("# Results (smoke profile)")
    assert "Teacher: tiny." in text and "Data: /data/sst2." in text
    assert "Measured on Test CPU, 2 threads" in text
    assert table(results["variants"]) in text
    results["environment"]["gpu"] = "Tesla T4"
    assert "Measured on Tesla T4;" in markdown(results)


def test_markdown_says_what_each_pruned_model_kept_once(results):
    assert "Kept by pruning" not in markdown(results)  # nothing pruned, nothing said
    pruned = {"heads_per_layer": [9, 12, 10]}
    slim = {**pruned, "neurons_per_layer": [700, 1536, 2], "tokens_kept": 11_576, "tokens_before": 30_522}
    results["variants"] += [
        {**variant("pruned_student", 1_000_000, 40.0, 88.0, 5.0, 6.0), **pruned},
        {**variant("pruned_student_int8", 1_000_000, 10.0, 88.0, 2.0, 3.0), **pruned},
        {**variant("slim_student", 800_000, 30.0, 87.5, 4.0, 5.0), **slim},
        {**variant("slim_student_bnb8", 800_000, 20.0, 87.5, 9.0, 9.5), **slim},
    ]
    text = markdown(results)
    assert [_cells(line)[-2] for line in table(results["variants"]).splitlines()[-4:]] == [
        "pruned_student", "pruned_student_int8", "slim_student", "slim_student_bnb8"]
    assert text.endswith(
        "Kept by pruning, per encoder layer (8-bit variants as their fp32 model):\n\n"
        "- pruned_student: heads 9, 12, 10 (31 in all)\n"
        "- slim_student: heads 9, 12, 10 (31 in all); FFN neurons 700, 1536, 2 (2,238 in all); "
        "vocabulary 11,576 of 30,522 tokens\n"
    )


def test_write_results(results, tmp_path):
    out = tmp_path / "out" / "nested"
    written = write_results(results, out)
    assert written == [out / "results.json", out / "results.md", out / "pareto.png"]
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "results.md").read_text() == markdown(results)
    png = (out / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "results.json", "results.md"]  # no temp files


def test_write_atomic_writes_and_replaces(tmp_path):
    path = tmp_path / "a" / "file.json"
    write_atomic(path, b"first")
    assert path.read_bytes() == b"first"
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["file.json"]


def test_write_atomic_keeps_a_replaced_files_mode_and_gives_a_new_one_the_umasks(tmp_path):
    import os

    path = tmp_path / "baselines.json"
    write_atomic(path, b"first")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    path.chmod(0o600)  # a private file stays private when accepted into
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second" and path.stat().st_mode & 0o777 == 0o600


def test_write_atomic_on_a_full_disk_names_the_file_and_leaves_it_whole(tmp_path, monkeypatch):
    import os

    import compression.report as report

    path = tmp_path / "baselines.json"
    write_atomic(path, b"old")
    real = os.fdopen

    def full_disk(fd, mode):
        f = real(fd, mode)
        f.write = lambda data: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return f

    monkeypatch.setattr(report.os, "fdopen", full_disk)
    with pytest.raises(ValueError, match=f"^{path}: cannot be written \\(No space left on device\\)$"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["baselines.json"]


def test_write_atomic_writes_through_a_symlink_and_refuses_a_loop(tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "real" / "file.json")  # dangling until written
    write_atomic(link, b"through")
    assert link.is_symlink() and (tmp_path / "real" / "file.json").read_bytes() == b"through"
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ValueError, match="a: cannot be resolved"):
        write_atomic(tmp_path / "a", b"x")


def test_write_atomic_names_the_file_it_cannot_write(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"afile/out.json: cannot be written \("):
        write_atomic(tmp_path / "afile" / "out.json", b"x")


def test_write_atomic_failed_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_bytes(b"old content")

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(report.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        write_atomic(path, b"new content")
    monkeypatch.undo()
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_write_atomic_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    path.write_bytes(b"old")
    real_fdopen = os.fdopen

    class Breaking:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt  # interrupted midway, not only an Exception

    monkeypatch.setattr(report.os, "fdopen", lambda fd, mode: Breaking(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b"new content that is long")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_pareto_png_is_png(results):
    assert report.pareto_png(results["variants"]).startswith(b"\x89PNG")
