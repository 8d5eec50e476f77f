"""Content-addressed artifact cache: atomic writes, verified loads, one builder per entry.

Every trained artifact lives in ``<root>/<stage>-<key>/`` where the key hashes everything that determines it
(base, data checksum, hyperparameters, seed, the key of the artifact it was made from). A folder is built under a
temporary name and renamed into place only once complete, so an interrupted run never leaves a folder that a later
run would trust. Its ``COMPLETE`` marker holds a manifest (every file's size and sha256), checked before each load:
a damaged entry is reported in one warning, removed and rebuilt. A per-entry lock (``<root>/.locks/``) makes a
second run on the same cache wait for an entry that another run is building, then reuse it. Temporary folders are
named ``.<stage>-<key>-<pid>-<random>``; those of a run that was killed are swept by the next one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from compression import tempdirs

log = logging.getLogger(__name__)

CACHE_ENV = "COMPRESSION_CACHE"
COMPLETE = "COMPLETE"
LOCKS = ".locks"  # lock files are kept (deleting one while another run waits on it would let two runs build)
T = TypeVar("T")

_CHUNK = 1 << 20
_warned_unverified: set[Path] = set()  # roots already warned about entries without a manifest


def default_root() -> Path:
    """$COMPRESSION_CACHE, else $XDG_CACHE_HOME/model-compression, else ~/.cache/model-compression."""
    # absolute: results.json records each variant's folder under it, for `compress export` run from anywhere
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(xdg) / "model-compression").absolute()


# Field metadata for a config field added after caches were made: at its default the field is left out of keys,
# so every entry made before it existed keeps its key (it was made with that default).
OMIT_DEFAULT = "cache_key_omits_default"


def cache_key(parts: dict) -> str:
    """A short stable hash of a JSON-able description (dataclasses are expanded, but fields marked
    `OMIT_DEFAULT` that hold their default are left out)."""

    def plain(obj):
        if dataclasses.is_dataclass(obj):
            return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                    if not (f.metadata.get(OMIT_DEFAULT) and getattr(obj, f.name) == f.default)}
        raise TypeError(f"cannot hash {type(obj).__name__} into a cache key")

    text = json.dumps(parts, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- manifest -------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file under `folder` but the marker, as sorted POSIX paths relative to it."""
    out = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(folder).as_posix()
            if rel != COMPLETE:
                out.append(rel)
    return sorted(out)


def manifest(folder: Path) -> dict[str, dict]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` for every file in `folder` but the marker."""
    return {rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)} for rel in _files(folder)}


class Unverified(Exception):
    """An entry whose marker has no manifest (written before manifests existed): nothing to check it against."""


def problem(folder: Path) -> str | None:
    """What is wrong with a complete-marked entry (missing, changed or unexpected file, bad marker), or None.

    Raises `Unverified` for an entry of the older layout. Sizes are compared before any file is hashed.
    """
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, UnicodeDecodeError) as err:
        return f"{COMPLETE} unreadable: {err}"
    except json.JSONDecodeError:
        return f"{COMPLETE} is not valid JSON"
    if not isinstance(marker, dict) or "files" not in marker:
        raise Unverified
    expected = marker["files"]
    if not isinstance(expected, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in expected.values()
    ):
        return f"{COMPLETE} has a malformed manifest"
    try:
        present = _files(folder)
        for rel in expected:
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            size = path.stat().st_size
            if size != expected[rel]["size"]:
                return f"{rel} is {size} bytes, the manifest says {expected[rel]['size']}"
        for rel in present:
            if rel not in expected:
                return f"{rel} is not in the manifest"
        for rel in expected:
            if _sha256(folder / rel) != expected[rel]["sha256"]:
                return f"{rel} has changed (sha256 differs from the manifest)"
    except OSError as err:
        return f"unreadable: {err}"
    return None


# --- the cache ------------------------------------------------------------------------------------------------

_MISSING = object()


def _try_load(final: Path, load: Callable[[Path], T]) -> tuple[object, str | None]:
    """(what `load` returned, None) for a sound entry; (_MISSING, why not) otherwise (why is None: absent)."""
    if not (final / COMPLETE).is_file():
        return _MISSING, None if not final.exists() else "no COMPLETE marker (an interrupted older build)"
    try:
        wrong = problem(final)
    except Unverified:
        return _MISSING, "unverified"
    if wrong is not None:
        return _MISSING, wrong
    try:
        return load(final), None
    except Exception as err:  # e.g. a file the manifest vouches for, but that this load cannot read
        if _of_the_machine(err):
            raise
        return _MISSING, f"loading it failed: {type(err).__name__}: {err}".splitlines()[0]


def _of_the_machine(err: Exception) -> bool:
    """Whether a failed load is the machine's doing, not the entry's (a missing package, memory, the GPU): then
    rebuilding would not help, and would throw away a sound entry that may have taken hours to train. (By name:
    this module does not import torch.)"""
    return (isinstance(err, (ImportError, MemoryError))
            or type(err).__name__ in ("OutOfMemoryError", "AcceleratorError") or "CUDA" in str(err))


def _entry_lock(root: Path, name: str) -> FileLock:
    (root / LOCKS).mkdir(parents=True, exist_ok=True)
    return FileLock(root / LOCKS / f"{name}.lock")


def _lock_is_free(root: Path, name: str) -> bool:
    """Whether nobody holds the entry's lock now (taken and released at once)."""
    lock = _entry_lock(root, name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    lock.release()
    return True


def sweep(root: Path) -> list[Path]:
    """Remove temporary folders ``.<stage>-<key>-<pid>-*`` of runs that died (and whose entry is not locked)."""

    def entry_free(folder: Path) -> bool:
        entry = re.fullmatch(r"\.(.+)-\d+-[a-z0-9_]+", folder.name).group(1)
        return _lock_is_free(root, entry)

    return tempdirs.sweep(root, r"\..+", entry_free)


def _discard(final: Path) -> None:
    """Remove an entry: renamed away first (atomic: a reader sees all of it or nothing), then deleted."""
    trash = final.with_name(f".{final.name}-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(final, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _build(root: Path, final: Path, stage: str, key: str, build: Callable[[Path], None]) -> None:
    work = Path(tempfile.mkdtemp(prefix="." + tempdirs.prefix(f"{stage}-{key}"), dir=root))
    try:
        build(work)
        marker = {"stage": stage, "key": key, "files": manifest(work)}
        (work / COMPLETE).write_text(json.dumps(marker, indent=1) + "\n")
        if final.exists():  # a damaged or unverifiable entry (reported by the caller): never trusted, replaced
            _discard(final)
        os.replace(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def cached(root: Path, stage: str, key: str, build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """Load ``root/stage-key`` if complete and intact; otherwise `build` into a fresh folder, mark, rename, load.

    A damaged entry (a file missing, resized or changed since it was written, or `load` failing on it) is one
    warning, then rebuilt. While another run builds the same entry, this one waits for it, then loads it.
    """
    final = root / f"{stage}-{key}"
    sweep(root)
    found, _ = _try_load(final, load)  # without the lock: a complete entry is only ever read
    if found is not _MISSING:
        log.info("%s: loaded cached %s", stage, final)
        return found
    root.mkdir(parents=True, exist_ok=True)
    lock = _entry_lock(root, final.name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: waiting for another run that is building %s", stage, final)
        lock.acquire()
    try:
        found, why = _try_load(final, load)  # again: the run we waited for may have built it
        if found is not _MISSING:
            log.info("%s: loaded cached %s", stage, final)
            return found
        _report(root, final, why)
        _build(root, final, stage, key, build)
    finally:
        lock.release()
    log.info("%s: saved %s", stage, final)
    return load(final)


def _report(root: Path, final: Path, why: str | None) -> None:
    if why is None:
        return
    if why == "unverified":
        if root not in _warned_unverified:  # a cache of the older layout: one line, not one per entry
            _warned_unverified.add(root)
            log.warning("cache %s: %s has no checksum manifest (written by an older version); rebuilding it and "
                        "every such entry", root, final.name)
        else:
            log.info("%s has no checksum manifest; rebuilding it", final)
        return
    if why.startswith("no COMPLETE"):
        log.info("%s: %s; rebuilding it", final, why)
        return
    log.warning("cache entry %s is damaged (%s); rebuilding it", final, why)
