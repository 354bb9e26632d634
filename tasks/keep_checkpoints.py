"""--keep-checkpoints N: the checkpoints of all finished iterations but the last N are deleted as the run goes.

At 7B every iteration's fine-tuned linears are a new ~13 GB checkpoint; an overnight plan of many iterations would
fill the disk with checkpoints nobody resumes from. After each finished iteration this deletes the older ones
exactly as `tierprune runs prune --keep-last N` does (tasks.runs.prune_checkpoints): records, tier maps, masks,
scores and evaluations stay. A rerun of the run then goes on after its last finished iteration
(tasks.start.finished_start), since the pruned iterations cannot be walked again.
"""
from __future__ import annotations

from prefect import get_run_logger, task

from .run_state import RunState
from .runs import prune_checkpoints

__all__ = ["keep_checkpoints_task"]


@task(name="keep-checkpoints")
def keep_checkpoints_task(state: RunState, keep_last: int) -> dict:
    """Delete the checkpoints of the finished iterations but the last `keep_last` (the flow holds the run's lock)."""
    done = prune_checkpoints(state.store, keep_last, locked=True)
    if done["steps"]:
        get_run_logger().info("--keep-checkpoints %d: deleted the checkpoints of iterations %s (%.2f GiB freed)",
                              keep_last, ", ".join(map(str, done["pruned"])), done["bytes"] / 2**30)
    return done
