"""Temporary folders named for the process that owns them, and sweeping those whose owner has died.

A run killed with SIGKILL (or by a power cut) never reaches its `finally`, so its temporary folders stay behind.
Each is named ``<prefix>-<pid>-<random>``; a later run removes those whose process no longer exists.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# What tempfile.mkdtemp appends: letters, digits and underscores (never a hyphen).
_RANDOM = r"[a-z0-9_]+"


def prefix(stem: str) -> str:
    """The mkdtemp/TemporaryDirectory prefix for `stem` owned by this process: ``<stem>-<pid>-``."""
    return f"{stem}-{os.getpid()}-"


def owner_pid(name: str, stem_pattern: str = r".+") -> int | None:
    """The PID in a folder name ``<stem>-<pid>-<random>`` whose stem matches `stem_pattern`, else None."""
    match = re.fullmatch(rf"(?:{stem_pattern})-(\d+)-{_RANDOM}", name)
    return int(match.group(1)) if match else None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a zombie has run its last line of code)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process: it exists
        return True
    try:  # Linux: "pid (comm) S ...", where S is the state; comm may itself contain ") "
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def sweep(
    parent: Path | str,
    stem_pattern: str,
    may_remove: Callable[[Path], bool] = lambda folder: True,
) -> list[Path]:
    """Remove the folders ``<stem>-<pid>-<random>`` in `parent` whose process is gone; returns what was removed.

    `may_remove` is a last check before removing (the cache asks whether the entry's lock is free, in case the
    PID belongs to another PID namespace, e.g. a container sharing the cache).
    """
    parent = Path(parent)
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:  # no such folder yet, or unreadable: nothing this run can sweep
        return removed
    for name in names:
        pid = owner_pid(name, stem_pattern)
        folder = parent / name
        if pid is None or pid == os.getpid() or pid_alive(pid) or not folder.is_dir() or folder.is_symlink():
            continue
        if not may_remove(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            log.info("removed %s, left by process %d, which no longer runs", folder, pid)
            removed.append(folder)
    return removed


def sweep_tmp(stem: str) -> list[Path]:
    """`sweep` the system temporary folder (tempfile.gettempdir()) for ``<stem>-<pid>-*`` folders."""
    return sweep(Path(tempfile.gettempdir()), re.escape(stem))
