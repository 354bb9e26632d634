"""Progress of long steps, for whoever shows it (the CLI's progress bars); silent when nobody listens.

Steps call `report_progress(stage, done, total)`; the CLI installs a listener with `listen`. One
listener per process: a run is one process, and the steps run in its main thread.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["report_progress", "listen"]

_listener: Callable[[str, int, int], None] | None = None


def report_progress(stage: str, done: int, total: int) -> None:
    """Tell the listener (if any) that `done` of `total` units of `stage` are finished."""
    if _listener is not None:
        _listener(stage, done, total)


@contextmanager
def listen(callback: Callable[[str, int, int], None]) -> Iterator[None]:
    """Send every report_progress to callback while the block runs."""
    global _listener
    previous, _listener = _listener, callback
    try:
        yield
    finally:
        _listener = previous
