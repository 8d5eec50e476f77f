"""Run a function in a fresh spawned child process, and SIGTERM handled like Ctrl-C.

`run_in_child(fn, *args)` returns what ``fn(*args)`` returns in the child, or raises what it raised. The child:

- dies with its parent: Linux's PR_SET_PDEATHSIG sends it SIGTERM when the parent dies (even by SIGKILL), and a
  watcher thread that polls the parent PID does the same where prctl is missing;
- cleans up when stopped: SIGTERM raises `Terminated` (a KeyboardInterrupt), so `finally` blocks and
  `with TemporaryDirectory()` run; further SIGTERM/SIGINT are ignored while it unwinds;
- is as quiet as the parent: the root log level and format, the Python warning filters and transformers'
  verbosity are applied before `fn` (and the heavy modules it needs) is unpickled.

A `multiprocessing.Process` and a `Pipe` are used, not a Pool or ProcessPoolExecutor: those keep semaphores, and a
parent killed mid-call made the resource tracker print "leaked semaphore objects" and BrokenPipe tracebacks.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM
STOP_GRACE_SECONDS = 30.0  # how long a stopped child may spend cleaning up before it is killed
_PR_SET_PDEATHSIG = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs."""


def _unwinder() -> Callable:
    """A signal handler that raises once (Terminated for SIGTERM, KeyboardInterrupt for SIGINT), then does nothing.

    Later signals must not cut short the clean-up the first one started (stopping the worker included). They are
    swallowed rather than set to SIG_IGN, which makes CPython print "Signal 15 ignored due to race condition" for
    one already pending.
    """
    fired = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(f"received {signal.Signals(signum).name}")

    return handler


def handle_sigterm() -> Any:
    """Make the next SIGTERM raise `Terminated` in the main thread (later ones are ignored while it unwinds).

    Returns the previous handler, for `signal.signal` to restore.
    """
    return signal.signal(signal.SIGTERM, _unwinder())


# --- the child --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What the child copies from its parent."""

    parent_pid: int
    log_level: int
    log_format: str | None
    warning_filters: list
    transformers_verbosity: int | None
    transformers_progress_bars: bool | None  # its own bars ("Loading weights"), not the Trainer's


# Libraries that give their own logger a stderr handler yet let its records propagate: behind a root handler (the
# CLI's), each of their warnings (huggingface_hub's retries, say) would print twice, once in each format.
SELF_HANDLED_LOGGERS = ("huggingface_hub", "datasets")


def print_library_logs_once() -> None:
    """Stop `SELF_HANDLED_LOGGERS` propagating to the root logger (their own handler prints them; transformers
    already keeps its logger to itself). Safe before those libraries are imported: their setup leaves it as is."""
    for name in SELF_HANDLED_LOGGERS:
        logging.getLogger(name).propagate = False


def _settings() -> _Settings:
    root = logging.getLogger()
    formats = [h.formatter._fmt for h in root.handlers if h.formatter is not None]
    # Only filters whose category the child can unpickle without importing anything (builtins warnings).
    filters = [f for f in warnings.filters if getattr(f[2], "__module__", None) == "builtins"]
    verbosity = bars = None
    if "transformers" in sys.modules:  # not imported: the child's default is the parent's default
        verbosity = sys.modules["transformers"].logging.get_verbosity()
        bars = sys.modules["transformers"].logging.is_progress_bar_enabled()
    return _Settings(os.getpid(), root.level, formats[0] if formats else None, filters, verbosity, bars)


def _apply(settings: _Settings) -> None:
    if settings.log_format is not None:
        logging.basicConfig(level=settings.log_level, format=settings.log_format)
        print_library_logs_once()
    logging.getLogger().setLevel(settings.log_level)
    warnings.resetwarnings()
    for action, message, category, module, lineno in reversed(settings.warning_filters):
        # (compiled patterns as Python stores them; plain strings as some tools insert them)
        warnings.filterwarnings(action, getattr(message, "pattern", message) or "", category,
                                getattr(module, "pattern", module) or "", lineno)
    if settings.transformers_verbosity is not None:
        # Read by transformers when it is first imported (the name for the level: "error", "warning", ...).
        os.environ["TRANSFORMERS_VERBOSITY"] = logging.getLevelName(settings.transformers_verbosity).lower()
        if "transformers" in sys.modules:  # already imported (e.g. by the parent's main module): too late for that
            sys.modules["transformers"].logging.set_verbosity(settings.transformers_verbosity)
    if settings.transformers_progress_bars is False:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by transformers when it is first imported
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.disable_progress_bar()


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent dies: prctl on Linux, and a polling thread as the fallback."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    threading.Thread(target=watch_parent, args=(parent_pid,), daemon=True, name="watch-parent").start()
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    """Poll until the parent PID changes (it died; this process was re-parented), then SIGTERM this process."""
    # Signals sent to the process must reach the main thread: one taken by this thread would run its Python
    # handler only when the main thread next runs bytecode, and a main thread asleep in time.sleep never would.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    stop = threading.Event()
    while not stop.wait(interval):
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _portable(err: BaseException, trace: str) -> BaseException:
    """`err` if it survives pickling, else a RuntimeError naming it; with the child's traceback as a note."""
    try:
        back = pickle.loads(pickle.dumps(err))
        if type(back) is not type(err) or str(back) != str(err):
            raise TypeError("changed by pickling")
    except Exception:
        back = RuntimeError(f"{type(err).__name__}: {err}")
    back.add_note("in the worker process:\n" + trace.rstrip())
    return back


def install_child_handlers() -> None:
    """SIGTERM and SIGINT raise once in this (child) process, so that its clean-up runs; later ones are ignored.

    (The parent kills a child whose clean-up takes longer than STOP_GRACE_SECONDS.)
    """
    handler = _unwinder()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _child_main(conn, payload: bytes, settings: _Settings) -> None:
    install_child_handlers()
    _die_with_parent(settings.parent_pid)
    try:
        _apply(settings)
        fn, args = pickle.loads(payload)  # imports fn's module here, after the settings above
        reply = ("ok", fn(*args))
    except Terminated:
        sys.exit(EXIT_TERMINATED)  # stopped by the parent, or the parent died: nobody waits for an answer
    except BaseException as err:  # noqa: BLE001  (everything, KeyboardInterrupt included, goes to the parent)
        reply = ("error", _portable(err, traceback.format_exc()))
    try:
        data = pickle.dumps(reply)
    except Exception as err:  # an unpicklable result
        data = pickle.dumps(("error", TypeError(f"the worker's result cannot be sent back: {err}")))
    try:
        conn.send_bytes(data)
    except OSError:  # the parent is gone
        pass
    finally:
        conn.close()


# --- the parent -------------------------------------------------------------------------------------------------


def _stop(process) -> None:
    """SIGTERM the child and give it time to clean up; kill it if it takes too long or we are interrupted again."""
    try:
        if process.is_alive():
            process.terminate()
            process.join(STOP_GRACE_SECONDS)
    finally:
        if process.is_alive():
            process.kill()
            process.join()


def run_in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh spawned process; its result, or its exception re-raised here.

    `fn` and `args` must be picklable (a module-level function). An exception keeps its type and message where it
    pickles (else it arrives as a RuntimeError naming it); KeyboardInterrupt included. If this process is
    interrupted (KeyboardInterrupt, `Terminated`), the child is stopped and allowed to clean up first.
    """
    payload = pickle.dumps((fn, args))  # here, so that an unpicklable fn fails in the caller, plainly
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(send, payload, _settings()), name=f"worker-{fn.__name__}")
    try:
        process.start()
        send.close()  # the child holds the only writer now: its death means EOF here
        # Poll, not a blocking read: a signal taken by another thread (torch's, say) runs its Python handler only
        # when this thread next runs bytecode.
        while not receive.poll(0.2):  # (the child's death closes the pipe: readable, EOF)
            pass
        try:
            status, value = pickle.loads(receive.recv_bytes())
        except EOFError:
            process.join()
            raise ChildProcessError(
                f"the worker process running {fn.__name__} died without an answer (exit code {process.exitcode})"
            ) from None
        process.join()
    except BaseException:
        _stop(process)
        raise
    finally:
        receive.close()
        send.close()
    if status == "error":
        raise value
    return value
