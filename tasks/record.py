"""The last step of an iteration: record which checkpoint, tier map and evaluation belong together.

An iteration counts as finished once its record is committed; `runs show`, `runs export` and
`--resume-from` read iterations through their records only.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prefect import task

from .refs import ArtifactRef, committed_or_compute

if TYPE_CHECKING:
    from .run_state import RunState

__all__ = ["iteration_record", "record_iteration_task"]


def iteration_record(run_uri: str, iteration: int, steps: dict[str, ArtifactRef]) -> dict:
    """The record's JSON: each step's folder relative to the run (so a moved store stays valid) and files."""
    def rel(ref: ArtifactRef) -> dict:
        return {"rel": ref.uri[len(run_uri) + 1:], "files": ref.files}

    # No timings here: a record must come out byte-identical when a crashed run is redone.
    return {"iteration": iteration, **{name: rel(ref) for name, ref in steps.items()}}


@task(name="record-iteration", persist_result=True)
def record_iteration_task(state: RunState, iteration: int, steps: dict[str, ArtifactRef]) -> ArtifactRef:
    """Mark the iteration finished; steps names its checkpoint, tiers and eval (and any other step it ran)."""
    record = iteration_record(state.store.uri, iteration, steps)
    material = {"record": record}
    return committed_or_compute(state.store, iteration, "iteration", material, lambda: {"iteration.json": record},
                                {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
