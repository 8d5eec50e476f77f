"""compression.cache: content-addressed folders built atomically and verified on load, locks, sweeping, keys."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import cache
from compression.cache import COMPLETE, LOCKS, cache_key, cached, default_root, problem


def listing(root: Path) -> list[str]:
    """What is in the cache root, less the lock files' folder."""
    return sorted(p.name for p in root.iterdir() if p.name != LOCKS)


class Recorder:
    """A build that writes one file and counts its calls, and a load that reads it back."""

    def __init__(self, payload: str = "weights"):
        self.payload = payload
        self.builds: list[Path] = []
        self.loads: list[Path] = []

    def build(self, folder: Path) -> None:
        self.builds.append(folder)
        assert folder.is_dir() and not any(folder.iterdir())  # a fresh, empty folder
        (folder / "model.bin").write_text(self.payload)

    def load(self, folder: Path) -> str:
        self.loads.append(folder)
        return (folder / "model.bin").read_text()


def test_cached_builds_once_then_loads(tmp_path):
    rec = Recorder()
    root = tmp_path / "cache"
    assert cached(root, "teacher", "abc123", rec.build, rec.load) == "weights"
    assert cached(root, "teacher", "abc123", rec.build, rec.load) == "weights"
    assert len(rec.builds) == 1
    final = root / "teacher-abc123"
    assert rec.loads == [final, final]
    assert rec.builds[0] != final  # built under a temporary name
    assert listing(root) == ["teacher-abc123"]


def test_cached_marks_complete(tmp_path):
    rec = Recorder()
    cached(tmp_path, "student", "k1", rec.build, rec.load)
    marker = tmp_path / "student-k1" / COMPLETE
    assert marker.is_file()
    doc = json.loads(marker.read_text())
    assert {k: doc[k] for k in ("stage", "key")} == {"stage": "student", "key": "k1"}
    # sha256 of b"weights"
    assert doc["files"] == {"model.bin": {
        "size": 7, "sha256": "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"}}
    assert sorted(p.name for p in (tmp_path / "student-k1").iterdir()) == [COMPLETE, "model.bin"]


def test_cached_different_keys_build_separately(tmp_path):
    a, b = Recorder("A"), Recorder("B")
    assert cached(tmp_path, "s", "k1", a.build, a.load) == "A"
    assert cached(tmp_path, "s", "k2", b.build, b.load) == "B"
    assert cached(tmp_path, "s", "k1", b.build, b.load) == "A"
    assert len(a.builds) == 1 and len(b.builds) == 1


def test_failed_build_leaves_nothing_then_rebuilds(tmp_path):
    root = tmp_path / "cache"
    calls = []

    def broken(folder: Path) -> None:
        calls.append(folder)
        (folder / "model.bin").write_text("half")
        raise RuntimeError("interrupted")

    def never_load(folder):
        raise AssertionError("load must not be called after a failed build")

    with pytest.raises(RuntimeError, match="interrupted"):
        cached(root, "teacher", "k", broken, never_load)
    assert len(calls) == 1
    assert not (root / "teacher-k").exists()
    assert listing(root) == []  # no leftover temporary folder
    assert not calls[0].exists()

    rec = Recorder()
    assert cached(root, "teacher", "k", rec.build, rec.load) == "weights"
    assert len(rec.builds) == 1
    assert (root / "teacher-k" / COMPLETE).is_file()
    assert listing(root) == ["teacher-k"]


def test_incomplete_final_folder_is_rebuilt_not_trusted(tmp_path):
    stale = tmp_path / "teacher-k"
    stale.mkdir()
    (stale / "model.bin").write_text("stale")
    rec = Recorder("fresh")
    assert cached(tmp_path, "teacher", "k", rec.build, rec.load) == "fresh"
    assert len(rec.builds) == 1
    assert (stale / COMPLETE).is_file()


# --- verification: a damaged entry is one warning, then rebuilt ------------------------------------------------


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def built_entry(root: Path, payload: str = "weights") -> tuple[Recorder, Path]:
    rec = Recorder(payload)
    cached(root, "teacher", "k", rec.build, rec.load)
    return rec, root / "teacher-k"


def damage_truncate(folder: Path) -> None:
    (folder / "model.bin").write_text("wei")


def damage_same_size(folder: Path) -> None:
    (folder / "model.bin").write_text("weiXhts")


def damage_remove(folder: Path) -> None:
    (folder / "model.bin").unlink()


def damage_extra(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("{}")


def damage_marker(folder: Path) -> None:
    (folder / COMPLETE).write_text('{"stage": "teacher", "ke')


def damage_manifest(folder: Path) -> None:
    (folder / COMPLETE).write_text('{"stage": "teacher", "key": "k", "files": {"model.bin": {"size": "7"}}}')


@pytest.mark.parametrize(("damage", "why"), [
    (damage_truncate, "model.bin is 3 bytes, the manifest says 7"),
    (damage_same_size, "model.bin has changed (sha256 differs from the manifest)"),
    (damage_remove, "model.bin is missing"),
    (damage_extra, "adapter_config.json is not in the manifest"),
    (damage_marker, "COMPLETE is not valid JSON"),
    (damage_manifest, "COMPLETE has a malformed manifest"),
])
def test_damaged_entry_is_one_warning_then_rebuilt(tmp_path, caplog, damage, why):
    rec, folder = built_entry(tmp_path)
    damage(folder)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cached(tmp_path, "teacher", "k", rec.build, rec.load) == "weights"
    (line,) = warnings_of(caplog)
    assert line == f"cache entry {folder} is damaged ({why}); rebuilding it"
    assert len(rec.builds) == 2
    assert rec.loads == [folder, folder]  # the damaged entry was never handed to load
    assert listing(tmp_path) == ["teacher-k"]
    caplog.clear()
    assert cached(tmp_path, "teacher", "k", rec.build, rec.load) == "weights"  # sound again: loaded, quietly
    assert len(rec.builds) == 2 and warnings_of(caplog) == []


def test_unreadable_entry_is_rebuilt(tmp_path, caplog, monkeypatch):
    rec, folder = built_entry(tmp_path)
    real = cache._sha256

    def unreadable(path):
        if path.parent == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(cache, "_sha256", unreadable)
    with caplog.at_level(logging.WARNING):
        assert cached(tmp_path, "teacher", "k", rec.build, rec.load) == "weights"
    (line,) = warnings_of(caplog)
    assert str(folder) in line and "unreadable: [Errno 13] Permission denied" in line
    assert len(rec.builds) == 2


def test_load_failing_on_a_verified_entry_is_one_warning_then_rebuilt(tmp_path, caplog):
    rec, folder = built_entry(tmp_path)
    # Fails for the first look (without the lock) and the second (under it, in case another run rebuilt it).
    failures = [ValueError("header too short\nsecond line") for _ in range(2)]

    def load(folder: Path) -> str:
        if failures:
            raise failures.pop()
        return rec.load(folder)

    with caplog.at_level(logging.WARNING):
        assert cached(tmp_path, "teacher", "k", rec.build, load) == "weights"
    (line,) = warnings_of(caplog)
    assert line == f"cache entry {folder} is damaged (loading it failed: ValueError: header too short); rebuilding it"
    assert len(rec.builds) == 2


class OutOfMemoryError(RuntimeError):  # named as torch's (torch.OutOfMemoryError), which the cache cannot import
    pass


@pytest.mark.parametrize("error", [OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   ImportError("No module named 'bitsandbytes'"), MemoryError()])
def test_load_failing_for_the_machine_is_raised_and_the_entry_kept(tmp_path, error):
    """Memory, the GPU or a missing package: rebuilding would not help, so the sound entry is neither called
    damaged nor trained again (the teacher's took hours)."""
    rec, folder = built_entry(tmp_path)

    def load(folder: Path) -> str:
        raise error

    with pytest.raises(type(error)):
        cached(tmp_path, "teacher", "k", rec.build, load)
    assert len(rec.builds) == 1 and problem(folder) is None
    assert cached(tmp_path, "teacher", "k", rec.build, rec.load) == "weights"  # still there, loaded as it is
    assert len(rec.builds) == 1


def test_load_failing_right_after_a_build_is_raised_not_retried(tmp_path):
    rec = Recorder()

    def load(folder: Path) -> str:
        raise ValueError("this load is broken")

    with pytest.raises(ValueError, match="this load is broken"):
        cached(tmp_path, "teacher", "k", rec.build, load)
    assert len(rec.builds) == 1


def test_entries_of_the_older_layout_are_rebuilt_with_one_warning(tmp_path, caplog):
    for stage in ("teacher", "student"):  # what the cache wrote before manifests
        folder = tmp_path / f"{stage}-k"
        folder.mkdir()
        (folder / "model.bin").write_text("old")
        (folder / COMPLETE).write_text(json.dumps({"stage": stage, "key": "k"}) + "\n")
    rec = Recorder("new")
    with caplog.at_level(logging.WARNING):
        assert cached(tmp_path, "teacher", "k", rec.build, rec.load) == "new"
        assert cached(tmp_path, "student", "k", rec.build, rec.load) == "new"
    (line,) = warnings_of(caplog)
    assert str(tmp_path) in line and "teacher-k has no checksum manifest" in line
    assert len(rec.builds) == 2
    assert all("files" in json.loads((tmp_path / f"{s}-k" / COMPLETE).read_text()) for s in ("teacher", "student"))


# the probes of the issue, on a real saved classifier


def test_real_model_truncated_or_overwritten_is_rebuilt(tmp_path, caplog, tiny_model, tiny_tokenizer, tiny_batch):
    import torch

    from compression.artifacts import save_classifier
    from compression.artifacts import load_model

    builds = []

    def build(folder: Path) -> None:
        builds.append(folder)
        save_classifier(tiny_model, tiny_tokenizer, folder)

    def load(folder: Path):
        return load_model(folder, "cpu")[0].eval()

    with torch.no_grad():
        expected = tiny_model(**tiny_batch).logits
    cached(tmp_path, "teacher", "k", build, load)
    weights = tmp_path / "teacher-k" / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])  # truncated: was a 75-line traceback naming no file
    with caplog.at_level(logging.WARNING):
        model = cached(tmp_path, "teacher", "k", build, load)
    (line,) = warnings_of(caplog)
    assert str(tmp_path / "teacher-k") in line and "model.safetensors is" in line and "the manifest says" in line
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_batch).logits, expected)

    caplog.clear()
    middle = len(data) // 2  # same size, garbage in the middle: was NaN logits
    weights.write_bytes(data[:middle] + b"\xff" * 4096 + data[middle + 4096:])
    assert weights.stat().st_size == len(data)
    with caplog.at_level(logging.WARNING):
        model = cached(tmp_path, "teacher", "k", build, load)
    (line,) = warnings_of(caplog)
    assert "model.safetensors has changed" in line
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_batch).logits, expected)
    assert len(builds) == 3


# --- one builder per entry -------------------------------------------------------------------------------------


def test_two_threads_build_once(tmp_path, caplog):
    go = threading.Event()
    builds = []

    def build(folder: Path) -> None:
        builds.append(folder)
        assert go.wait(30)
        (folder / "model.bin").write_text("weights")

    def load(folder: Path) -> str:
        return (folder / "model.bin").read_text()

    results = []
    first = threading.Thread(target=lambda: results.append(cached(tmp_path, "teacher", "k", build, load)))
    with caplog.at_level(logging.INFO, logger="compression.cache"):
        first.start()
        deadline = time.monotonic() + 30
        while not builds:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        second = threading.Thread(target=lambda: results.append(cached(tmp_path, "teacher", "k", build, load)))
        second.start()
        while not any("waiting for another run" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the second run did not wait"
            time.sleep(0.01)
        go.set()
        first.join(30)
        second.join(30)
    assert results == ["weights", "weights"]
    assert len(builds) == 1


CONCURRENT_RUN = """
import logging, sys, time
from pathlib import Path
from compression.cache import cached

logging.basicConfig(level=logging.INFO, format="%(message)s")
root, work = Path(sys.argv[1]), Path(sys.argv[2])

def build(folder):
    with (work / "builds").open("a") as f:
        f.write(f"{folder}\\n")
    while not (work / "go").exists():
        time.sleep(0.02)
    (folder / "model.bin").write_text("weights")

print(cached(root, "teacher", "k", build, lambda folder: (folder / "model.bin").read_text()))
"""


def test_two_processes_build_once(tmp_path):
    root, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def start(name: str) -> subprocess.Popen:
        err = open(work / f"{name}.err", "w")
        return subprocess.Popen([sys.executable, "-c", CONCURRENT_RUN, str(root), str(work)], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    first = start("first")
    wait_for(lambda: (work / "builds").exists(), "the first run did not start building")
    second = start("second")
    wait_for(lambda: "waiting for another run" in (work / "second.err").read_text(), "the second run did not wait")
    (work / "go").touch()
    assert [p.communicate(timeout=60)[0] for p in (first, second)] == ["weights\n", "weights\n"]
    assert (first.returncode, second.returncode) == (0, 0)
    assert len((work / "builds").read_text().splitlines()) == 1
    assert listing(root) == ["teacher-k"]


# --- sweeping what killed runs left behind ----------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_folders_of_dead_runs_are_swept(tmp_path):
    dead = dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = [tmp_path / f".teacher-k-{dead}-abc_123x", tmp_path / f".pruned_student_int8-0123abcd-{dead}-q1w2e3r4"]
        kept = [
            tmp_path / f".teacher-k-{alive.pid}-abcdefgh",  # its run is still going
            tmp_path / f".teacher-k-{os.getpid()}-abcdefgh",  # ours
            tmp_path / ".student-k-abcdefgh",  # no PID in the name (older layout): not ours to judge
            tmp_path / f"teacher-{dead}-abcdefgh",  # not hidden: not a temporary folder of the cache
        ]
        for folder in left + kept:
            folder.mkdir()
            (folder / "model.bin").write_text("half")
        rec = Recorder()
        cached(tmp_path, "student", "k2", rec.build, rec.load)
        assert listing(tmp_path) == sorted([p.name for p in kept] + ["student-k2"])
    finally:
        alive.kill()
        alive.wait()


def test_a_locked_entry_is_not_swept(tmp_path):
    # A dead PID whose entry is locked: the PID may be another PID namespace's (a container sharing the cache).
    folder = tmp_path / f".teacher-k-{dead_pid()}-abcdefgh"
    folder.mkdir()
    lock = cache._entry_lock(tmp_path, "teacher-k")
    with lock:
        assert cache.sweep(tmp_path) == []
    assert folder.is_dir()
    assert cache.sweep(tmp_path) == [folder]
    assert not folder.exists()


def test_temporary_folder_names_carry_the_pid(tmp_path):
    seen = []
    cached(tmp_path, "teacher", "k", lambda folder: seen.append(folder.name), lambda folder: None)
    (name,) = seen
    assert name.startswith(f".teacher-k-{os.getpid()}-")


# --- cache_key ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    lr: float = 1e-4
    epochs: int = 1


def test_cache_key_known_shape_and_stable():
    key = cache_key({"base": "x", "seed": 42})
    assert len(key) == 16 and all(c in "0123456789abcdef" for c in key)
    assert key == cache_key({"seed": 42, "base": "x"})
    assert key != cache_key({"base": "x", "seed": 43})
    assert key != cache_key({"base": "y", "seed": 42})
    assert key != cache_key({"base": "x", "seed": 42, "extra": None})


def test_cache_key_expands_dataclasses():
    assert cache_key({"cfg": Config()}) == cache_key({"cfg": {"epochs": 1, "lr": 1e-4}})
    assert cache_key({"cfg": Config()}) != cache_key({"cfg": Config(lr=2e-4)})


def test_cache_key_rejects_unhashable_objects():
    with pytest.raises(TypeError, match="object"):
        cache_key({"x": object()})


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=8),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
parts_strategy = st.dictionaries(st.text(max_size=6), json_values, min_size=1, max_size=6)


@settings(max_examples=30, deadline=None)
@given(parts=parts_strategy, data=st.data())
def test_cache_key_stable_under_key_order(parts, data):
    shuffled_keys = data.draw(st.permutations(list(parts)))
    reordered = {k: parts[k] for k in shuffled_keys}
    assert cache_key(reordered) == cache_key(parts)
    assert cache_key(json.loads(json.dumps(parts))) == cache_key(parts)


@settings(max_examples=30, deadline=None)
@given(parts=parts_strategy, data=st.data())
def test_cache_key_changes_when_a_value_changes(parts, data):
    key = data.draw(st.sampled_from(sorted(parts)))
    old = json.dumps(parts[key], sort_keys=True)
    new_value = data.draw(json_values.filter(lambda v: json.dumps(v, sort_keys=True) != old))
    changed = {**parts, key: new_value}
    assert cache_key(changed) != cache_key(parts)


# --- default_root ------------------------------------------------------------------------------------------


def test_default_root_env_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "mine"


def test_default_root_is_absolute_where_given_relative(monkeypatch, tmp_path):
    # results.json records each variant's folder under the root: `compress export` may run from elsewhere
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(cache.CACHE_ENV, "rel")
    assert default_root() == tmp_path / "rel"
    monkeypatch.setenv(cache.CACHE_ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", "xdg")
    assert default_root() == tmp_path / "xdg" / "model-compression"


def test_default_root_env_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(cache.CACHE_ENV, "~/c")
    assert default_root() == tmp_path / "c"


def test_default_root_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "model-compression"


@pytest.mark.parametrize("xdg", [None, ""])
def test_default_root_home(monkeypatch, tmp_path, xdg):
    monkeypatch.setenv(cache.CACHE_ENV, "")  # empty counts as unset
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_root() == tmp_path / ".cache" / "model-compression"


def test_a_field_marked_omit_default_leaves_keys_as_they_were_until_set():
    """A config field added later (metadata OMIT_DEFAULT) keeps every key made before it existed while it holds its
    default, and moves the key once set; unmarked fields always count."""
    import dataclasses

    from compression.cache import OMIT_DEFAULT, cache_key

    @dataclasses.dataclass(frozen=True)
    class Before:
        rate: float = 0.1

    @dataclasses.dataclass(frozen=True)
    class After:
        rate: float = 0.1
        extra: float = dataclasses.field(default=0.0, metadata={OMIT_DEFAULT: True})

    @dataclasses.dataclass(frozen=True)
    class Unmarked:
        rate: float = 0.1
        extra: float = 0.0

    assert cache_key({"c": After()}) == cache_key({"c": Before()})
    assert cache_key({"c": After(extra=1.0)}) != cache_key({"c": Before()})
    assert cache_key({"c": Unmarked()}) != cache_key({"c": Before()})
    assert cache_key({"c": [After(rate=0.2)]}) == cache_key({"c": [Before(rate=0.2)]})  # nested too
