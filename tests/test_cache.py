"""compression.cache: content-addressed folders built atomically, keys, and the default root."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import cache
from compression.cache import COMPLETE, cache_key, cached, default_root


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
    assert sorted(p.name for p in root.iterdir()) == ["teacher-abc123"]


def test_cached_marks_complete(tmp_path):
    rec = Recorder()
    cached(tmp_path, "student", "k1", rec.build, rec.load)
    marker = tmp_path / "student-k1" / COMPLETE
    assert marker.is_file()
    assert json.loads(marker.read_text()) == {"stage": "student", "key": "k1"}
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
    assert list(root.iterdir()) == []  # no leftover temporary folder
    assert not calls[0].exists()

    rec = Recorder()
    assert cached(root, "teacher", "k", rec.build, rec.load) == "weights"
    assert len(rec.builds) == 1
    assert (root / "teacher-k" / COMPLETE).is_file()
    assert [p.name for p in root.iterdir()] == ["teacher-k"]


def test_incomplete_final_folder_is_rebuilt_not_trusted(tmp_path):
    stale = tmp_path / "teacher-k"
    stale.mkdir()
    (stale / "model.bin").write_text("stale")
    rec = Recorder("fresh")
    assert cached(tmp_path, "teacher", "k", rec.build, rec.load) == "fresh"
    assert len(rec.builds) == 1
    assert (stale / COMPLETE).is_file()


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
