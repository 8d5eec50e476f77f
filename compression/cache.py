"""Content-addressed artifact cache with atomic writes.

Every trained artifact lives in ``<root>/<stage>-<key>/`` where the key hashes everything that determines it
(base, data checksum, hyperparameters, seed, the key of the artifact it was made from). A folder is built under a
temporary name and renamed into place only once complete, so an interrupted run never leaves a folder that a later
run would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

CACHE_ENV = "COMPRESSION_CACHE"
COMPLETE = "COMPLETE"
T = TypeVar("T")


def default_root() -> Path:
    """$COMPRESSION_CACHE, else $XDG_CACHE_HOME/model-compression, else ~/.cache/model-compression."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "model-compression"


def cache_key(parts: dict) -> str:
    """A short stable hash of a JSON-able description (dataclasses are expanded)."""

    def plain(obj):
        if dataclasses.is_dataclass(obj):
            return dataclasses.asdict(obj)
        raise TypeError(f"cannot hash {type(obj).__name__} into a cache key")

    text = json.dumps(parts, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached(root: Path, stage: str, key: str, build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """Load ``root/stage-key`` if complete; otherwise `build` into a fresh folder, mark it, rename, then load."""
    final = root / f"{stage}-{key}"
    if (final / COMPLETE).is_file():
        log.info("%s: loading cached %s", stage, final)
        return load(final)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{stage}-{key}-", dir=root))
    try:
        build(work)
        (work / COMPLETE).write_text(json.dumps({"stage": stage, "key": key}) + "\n")
        if final.exists():  # a stale, incomplete folder from an older layout: never trusted, replaced
            shutil.rmtree(final)
        os.replace(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    log.info("%s: saved %s", stage, final)
    return load(final)
