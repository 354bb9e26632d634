"""The progressive flow: iteration 0 evaluates the dense model; each iteration k then runs
collect activations → score blocks → demote → finetune → evaluate, as the plan's row k says.

Wiring only: every step is a task over the run store (tierprune.tasks.steps) and passes small
references along. Rerunning the same flow after a crash recomputes nothing that was committed.
"""
from __future__ import annotations

import time

from prefect import flow, get_run_logger

from tierprune.config import ProgressiveConfig
from tierprune.plan import load_plan
from tierprune.tasks.report import report_task
from tierprune.tasks.steps import (
    collect_activations_task,
    demote_task,
    dense_start_task,
    evaluate_task,
    finetune_task,
    open_run,
    record_iteration_task,
    resume_start_task,
    run_lock,
    score_blocks_task,
)


@flow(name="progressive", log_prints=False)
def progressive(cfg: ProgressiveConfig) -> list[dict]:
    """Run (or resume) a progressive three-tier run; returns one summary row per iteration."""
    logger = get_run_logger()
    plan = load_plan(cfg.plan)
    open_run(cfg)
    rows = []
    with run_lock(cfg):
        if cfg.resume_from:
            start, checkpoint, tiers = resume_start_task(cfg)
        else:
            start = 0
            checkpoint, tiers = dense_start_task(cfg)
            evaluation = evaluate_task(cfg, 0, checkpoint, tiers)
            record_iteration_task(cfg, 0, checkpoint, tiers, evaluation)
            rows.append(report_task(cfg, 0, evaluation, tiers, 0.0))
        for step in plan.steps:
            k = step.iteration
            if k <= start:
                continue
            began = time.perf_counter()
            activations = collect_activations_task(cfg, k, checkpoint)
            scores = score_blocks_task(cfg, k, checkpoint, activations)
            tiers = demote_task(cfg, k, tiers, scores)
            checkpoint = finetune_task(cfg, k, checkpoint, tiers, activations)
            evaluation = evaluate_task(cfg, k, checkpoint, tiers)
            record_iteration_task(cfg, k, checkpoint, tiers, evaluation)
            rows.append(report_task(cfg, k, evaluation, tiers, time.perf_counter() - began))
            logger.info("iteration %d done: %s", k, rows[-1])
    return rows


if __name__ == "__main__":
    import sys

    # A tiny preset: the embedded SmolLM2, the smoke plan, a local store.
    progressive(ProgressiveConfig(plan="schedules/plans/smoke.csv", store=sys.argv[1] if len(sys.argv) > 1 else "runs",
                                  run="smoke"))
