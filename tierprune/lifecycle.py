"""The CLI process's life and death: a Prefect server that dies with it, and a quick, clean SIGTERM/SIGINT.

- `guard_flow_process()` is called by `tierprune run` and `tierprune demo` just before the flow starts. It
  starts Prefect's ephemeral API server (when no PREFECT_API_URL is set) under a watchdog: a tiny child
  process that reads server pids from a pipe whose only writer is this process. However this process ends
  (exit, exception, SIGKILL, OOM killer), the kernel closes the pipe, the watchdog reads EOF and terminates
  the server. Without it a SIGKILLed CLI leaves the server listening forever.
- SIGTERM and SIGINT raise `Terminated` in the main thread, so that context managers and `finally` blocks
  release the run's lock and remove temporary files. Prefect's own SIGTERM bridge is switched off for the
  CLI: it turns SIGTERM into a crash report to the API, which takes minutes of retries when the server got
  the same signal (a terminal's Ctrl-C or a `kill` of the process group). If the unwinding takes longer than
  `GRACE_SECONDS` (or a second signal comes), the registered cleanups run and the process exits at once.
- `on_termination(fn)` registers a cleanup for that hard path; the run store registers its lock's release
  and the temporary files it is writing.

While terminating, stdout and stderr are pointed at /dev/null so that the user sees one `error:` line, not
the tracebacks of a flow engine whose server is gone.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

__all__ = ["Terminated", "GRACE_SECONDS", "guard_flow_process", "install_signal_handlers", "on_termination",
           "cancel_on_termination", "cleanup_on_termination", "run_cleanups", "termination_message", "write_error_line"]

GRACE_SECONDS = 5.0

_cleanups: dict[int, Callable[[], None]] = {}
_handles = itertools.count()
_terminating: int | None = None
_saved_stderr: int | None = None
_watchdog: subprocess.Popen | None = None


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived: unwind (a BaseException, so `except Exception` in user code lets it pass)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum


# ---- cleanups for the hard path --------------------------------------------------------------------------

def on_termination(fn: Callable[[], None]) -> int:
    """Run fn (best effort) if the process is terminated before cancel_on_termination(handle)."""
    handle = next(_handles)
    _cleanups[handle] = fn
    return handle


def cancel_on_termination(handle: int | None) -> None:
    _cleanups.pop(handle, None)


@contextlib.contextmanager
def cleanup_on_termination(fn: Callable[[], None]) -> Iterator[None]:
    """fn runs on a hard termination while the block runs (the block's own `finally` covers the rest)."""
    handle = on_termination(fn)
    try:
        yield
    finally:
        cancel_on_termination(handle)


def run_cleanups() -> None:
    """Run every registered cleanup once, newest first; one failing cleanup does not stop the others."""
    while _cleanups:
        handle = max(_cleanups)
        fn = _cleanups.pop(handle)
        try:
            fn()
        except Exception:  # best effort on the way out: a cleanup that fails must not stop the others
            pass


# ---- signals ---------------------------------------------------------------------------------------------

def write_error_line(message: str) -> None:
    """Write `error: message` to the real stderr, even after it was silenced for terminating."""
    fd = _saved_stderr if _saved_stderr is not None else sys.stderr.fileno()
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os.write(fd, f"error: {message}\n".encode())


def _silence_output() -> None:
    global _saved_stderr
    if _saved_stderr is not None:
        return
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    _saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def termination_message(signal_name: str) -> str:
    return (f"terminated ({signal_name}); the run's lock was released and no step was left half-committed: "
            "rerun the same command to resume")


def _hard_exit(signum: int) -> None:
    run_cleanups()
    name = signal.Signals(signum).name
    with contextlib.suppress(OSError):
        write_error_line(termination_message(name))
    os._exit(128 + signum)


def _handle(signum: int, frame: object) -> None:
    global _terminating
    if _terminating is not None:
        _hard_exit(signum)  # a second signal: no more patience
    _terminating = signum
    _silence_output()
    timer = threading.Timer(GRACE_SECONDS, _hard_exit, args=(signum,))
    timer.daemon = True
    timer.start()
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT raise Terminated in the main thread (call from the main thread)."""
    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)


def _disable_prefect_sigterm_bridge() -> None:
    # Prefect 3's flow engine swaps in a SIGTERM handler for the flow's duration (for runners that cancel
    # flows by SIGTERM) and reports the crash to the API before re-raising the signal: minutes when the API
    # is gone. The CLI is not run by a runner, so the flow keeps our handler.
    from prefect import flow_engine

    if hasattr(flow_engine, "capture_sigterm"):
        flow_engine.capture_sigterm = contextlib.nullcontext


# ---- the ephemeral server's watchdog ---------------------------------------------------------------------

# Reads pids, one a line, until EOF (this process gone), then terminates them: SIGTERM, then SIGKILL after 5 s.
# SIGINT and SIGHUP are ignored, so that a terminal's Ctrl-C or hang-up reaching the whole process group
# cannot kill the watchdog before the CLI is gone.
_WATCHDOG = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
pids = [int(line) for line in sys.stdin if line.strip()]
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (its new parent has not reaped it yet) is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
for pid in pids:
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
deadline = time.monotonic() + 5
while any(alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.05)
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
"""


def _watch(pid: int) -> None:
    """Make process pid die with this one."""
    global _watchdog
    if _watchdog is None or _watchdog.poll() is not None:
        # stdout/stderr to /dev/null: the watchdog must not hold a caller's pipe open after we are gone.
        _watchdog = subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    assert _watchdog.stdin is not None
    _watchdog.stdin.write(f"{pid}\n".encode())
    _watchdog.stdin.flush()


def _start_watched_ephemeral_server() -> None:
    """Start Prefect's ephemeral API server now, if this process would use one, with its pid watched."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's clients use (one per port; None = the ephemeral one)
    if server.running:
        return
    start_process = server._run_uvicorn_command

    def start_and_watch() -> subprocess.Popen:
        # Watched the moment it exists: start() then waits seconds for the server's health check.
        process = start_process()
        _watch(process.pid)
        return process

    server._run_uvicorn_command = start_and_watch  # start() retries on another port through this too
    server.start()


def guard_flow_process() -> None:
    """Before a flow runs in this process: quick clean SIGTERM/SIGINT, and a Prefect server that dies with us."""
    install_signal_handlers()
    _disable_prefect_sigterm_bridge()
    _start_watched_ephemeral_server()
