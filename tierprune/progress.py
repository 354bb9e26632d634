"""Step progress, reported by the steps and shown by whoever listens (the CLI's progress bars).

A step calls `report("iteration 2: collect activations", done, total)` as it goes; the CLI wraps a flow in
`reporting(callback)`, and each distinct step name gets one progress line. With nobody listening, report()
costs a loop over an empty list. Listeners run in the reporting thread and must be quick.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Reporter", "report", "reporting"]

Reporter = Callable[[str, int, int], None]

_reporters: list[Reporter] = []


def report(step: str, done: int, total: int) -> None:
    """Tell every listener that `step` has done `done` of `total` units (layers, windows, files...)."""
    for reporter in list(_reporters):
        reporter(step, done, total)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Send every report() made while the block runs to reporter."""
    _reporters.append(reporter)
    try:
        yield
    finally:
        _reporters.remove(reporter)
