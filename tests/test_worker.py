"""compression.worker: a function run in a spawned child; its result, its exceptions, its death with the parent."""

from __future__ import annotations

import logging
import operator
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from compression import worker
from compression.tempdirs import pid_alive
from compression.worker import Terminated, run_in_child

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# Run in the child (module level, so that they pickle by reference).


def interrupt() -> None:
    raise KeyboardInterrupt


class TwoArgumentError(Exception):
    """An exception that does not survive pickling (its __init__ needs two arguments, its args hold one)."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def raise_two_argument_error() -> None:
    raise TwoArgumentError("this", "that")


def child_state() -> dict:
    """What the child inherited: its log level, whether a DeprecationWarning would show, transformers' setting."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("deprecated", DeprecationWarning)
        warnings.warn("future", FutureWarning)
    return {
        "pid": os.getpid(),
        "level": logging.getLogger().level,
        "shown": sorted(w.category.__name__ for w in caught),
        "transformers_verbosity": os.environ.get("TRANSFORMERS_VERBOSITY"),
        "progress_bars": _progress_bars(),
    }


def _progress_bars() -> bool:
    import transformers

    return transformers.logging.is_progress_bar_enabled()


# --- results and exceptions ------------------------------------------------------------------------------------


def test_returns_the_result_of_another_process():
    assert run_in_child(operator.add, 2, 3) == 5
    assert run_in_child(os.getpid) != os.getpid()


@pytest.mark.parametrize(("fn", "arg"), [(int, "x"), (open, "/no/such/file"), (operator.truediv, 1)])
def test_exceptions_keep_their_type_and_message(fn, arg):
    args = (arg, 0) if fn is operator.truediv else (arg,)
    with pytest.raises(Exception) as here:
        fn(*args)
    with pytest.raises(Exception) as there:
        run_in_child(fn, *args)
    assert type(there.value) is type(here.value)
    assert str(there.value) == str(here.value)
    assert "in the worker process:" in there.value.__notes__[0]  # the child's traceback comes along


def test_os_error_keeps_errno_and_filename():
    with pytest.raises(FileNotFoundError) as err:
        run_in_child(open, "/no/such/file")
    assert (err.value.errno, err.value.filename) == (2, "/no/such/file")


def test_keyboard_interrupt_in_the_child_is_raised_here():
    with pytest.raises(KeyboardInterrupt):
        run_in_child(interrupt)


def test_an_exception_that_cannot_be_pickled_arrives_as_runtime_error():
    with pytest.raises(RuntimeError) as err:
        run_in_child(raise_two_argument_error)
    assert str(err.value) == "TwoArgumentError: this and that"


def test_a_function_that_cannot_be_pickled_fails_here():
    with pytest.raises((pickle.PicklingError, AttributeError)):
        run_in_child(lambda: 1)


def test_a_child_that_dies_without_an_answer():
    with pytest.raises(ChildProcessError, match="exit code 3"):
        run_in_child(os._exit, 3)


def test_the_child_is_as_quiet_as_the_parent(monkeypatch):
    import transformers

    before, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # as `compress run` does: no "Loading weights" bar in the child
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("always", FutureWarning)
            quiet = run_in_child(child_state)
            warnings.simplefilter("always", DeprecationWarning)
            loud = run_in_child(child_state)
    finally:
        transformers.logging.set_verbosity(before)
        if bars:
            transformers.logging.enable_progress_bar()
    assert quiet["level"] == logging.getLogger().level
    assert quiet["shown"] == ["FutureWarning"]
    assert loud["shown"] == ["DeprecationWarning", "FutureWarning"]
    assert quiet["transformers_verbosity"] == "error" and quiet["progress_bars"] is False


# --- the child dies with its parent ----------------------------------------------------------------------------

PARENT = """
import os, sys, time
from pathlib import Path
from compression.worker import run_in_child

def sleeper(work):
    (Path(work) / "child.pid").write_text(str(os.getpid()))
    try:
        time.sleep(120)
    finally:  # runs only if SIGTERM unwinds the child (the default action would end it on the spot)
        (Path(work) / "cleaned").write_text("yes")

if __name__ == "__main__":
    run_in_child(sleeper, sys.argv[1])
"""

# The fallback: a grandchild started without prctl, watching its parent's PID.
MIDDLE = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], str(__import__("os").getpid())]).wait()
"""
WATCHER = """
import os, signal, sys, threading, time
from pathlib import Path
from compression import worker

work, parent = Path(sys.argv[1]), int(sys.argv[2])
worker.install_child_handlers()
threading.Thread(target=worker.watch_parent, args=(parent, 0.1), daemon=True).start()
(work / "child.pid").write_text(str(os.getpid()))
try:
    time.sleep(120)
finally:
    (work / "cleaned").write_text("yes")
"""


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["prctl", "watcher"])
def test_the_child_dies_with_its_parent(tmp_path, how):
    if how == "prctl":
        script = tmp_path / "parent.py"
        script.write_text(PARENT)
        command = [sys.executable, str(script), str(tmp_path)]
    else:
        command = [sys.executable, "-c", MIDDLE, WATCHER, str(tmp_path)]
    parent = subprocess.Popen(command, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "child.pid").exists() and (tmp_path / "child.pid").read_text(), 120,
                 "the child did not start")
        child = int((tmp_path / "child.pid").read_text())
        assert pid_alive(child)
        parent.kill()  # SIGKILL: no clean-up of its own, no chance to stop the child
        parent.wait()
        wait_for(lambda: not pid_alive(child), 10, f"the child {child} outlived its parent")
        assert (tmp_path / "cleaned").read_text() == "yes"
    finally:
        parent.kill()
        parent.communicate()


def test_terminated_is_a_keyboard_interrupt():
    # So that every `except KeyboardInterrupt` / `finally` that handles Ctrl-C handles SIGTERM too.
    assert issubclass(Terminated, KeyboardInterrupt)
    assert worker.EXIT_TERMINATED == 128 + signal.SIGTERM == 143


# --- library warnings print once -------------------------------------------------------------------------------

LOGS_ONCE = """
import logging, sys
from compression import worker

def child():
    import datasets, huggingface_hub.utils.logging  # noqa: F401, E401 (each gives its logger a stderr handler)
    logging.getLogger("datasets.load").warning("in the child")

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")  # as the CLI sets up
    if sys.argv[1] == "once":
        worker.print_library_logs_once()
    import datasets, huggingface_hub.utils.logging  # noqa: F401, E401 (the handlers come with these)
    logging.getLogger("huggingface_hub.utils._http").warning("in the parent")
    worker.run_in_child(child)
"""


@pytest.mark.parametrize("once", [True, False])
def test_library_warnings_print_once_in_parent_and_child(tmp_path, once):
    # huggingface_hub's retry warnings printed twice (its handler's plain line, then the root's timestamped one)
    script = tmp_path / "logs_once.py"
    script.write_text(LOGS_ONCE)
    done = subprocess.run([sys.executable, str(script), "once" if once else "twice"], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # without it, the parent shows the duplicate this guards against (so the test can tell); the child sets it
    # up itself whenever the parent has a root handler
    assert done.stderr.count("in the parent") == (1 if once else 2)
    assert done.stderr.count("in the child") == 1
