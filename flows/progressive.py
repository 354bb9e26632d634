"""The progressive flow: iteration 0 evaluates the dense model; each iteration k then runs
collect activations → score blocks → demote → finetune → evaluate, as the plan's row k says.

Wiring only: every step is a task over the run store and passes small references along; the
steps share one RunState (the store, the plan, the working model). Rerunning the same flow after a
crash recomputes nothing that was committed.
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from tierprune.config import TierpruneConfig
from tierprune.tasks.collect_activations import collect_activations_task
from tierprune.tasks.demote import demote_task
from tierprune.tasks.evaluate import evaluate_task
from tierprune.tasks.finetune import finetune_task
from tierprune.tasks.record import record_iteration_task
from tierprune.tasks.report import report_task
from tierprune.tasks.run_state import RunState, open_run, run_lock
from tierprune.tasks.score_blocks import score_blocks_task
from tierprune.tasks.start import dense_start_task, resume_start_task


@flow(name="progressive", log_prints=False)
def progressive(cfg: TierpruneConfig) -> list[dict]:
    """Run (or resume) a progressive three-tier run; returns one summary row per iteration."""
    logger = get_run_logger()
    state = RunState(cfg)
    rows = []
    with run_lock(state):
        open_run(state)
        if cfg.run.resume_from:
            start, checkpoint = resume_start_task(state)
            tiers = checkpoint
        else:
            start = 0
            checkpoint = tiers = dense_start_task(state)
            evaluation = evaluate_task(state, 0, checkpoint, tiers)
            record_iteration_task(state, 0, {"checkpoint": checkpoint, "tiers": tiers, "eval": evaluation})
            rows.append(report_task(state, 0, evaluation, tiers, checkpoint.seconds + evaluation.seconds))
        for step in state.plan.steps:
            k = step.iteration
            if k <= start:
                continue
            activations = collect_activations_task(state, k, checkpoint)
            scores = score_blocks_task(state, k, checkpoint, activations)
            tiers = demote_task(state, k, checkpoint, tiers, scores, activations)
            checkpoint = finetune_task(state, k, checkpoint, tiers)
            evaluation = evaluate_task(state, k, checkpoint, tiers)
            steps = {"activations": activations, "scores": scores, "tiers": tiers, "checkpoint": checkpoint,
                     "eval": evaluation}
            record_iteration_task(state, k, steps)
            seconds = sum(ref.seconds for ref in steps.values())
            rows.append(report_task(state, k, evaluation, tiers, seconds, checkpoint))
            logger.info("iteration %d done: %s", k, rows[-1])
    return rows


if __name__ == "__main__":
    import sys

    from tierprune.config import config_from_flags

    # A tiny preset: the embedded SmolLM2, the smoke plan, a local store, a quick look at the numbers.
    progressive(config_from_flags(plan="schedules/plans/smoke.csv", store=sys.argv[1] if len(sys.argv) > 1 else "runs",
                                  run="smoke", calib_samples=16, calib_seqlen=512, eval_seqlen=512,
                                  eval_max_windows=16))
