"""The progressive flow: iteration 0 evaluates the dense model; each iteration k then runs
collect activations → score blocks → demote → finetune → evaluate, as the plan's row k says.

Wiring only: every step is a task over the run store and passes small references along; the
steps share one RunState (the store, the plan, the working model). Rerunning the same flow after a
crash recomputes nothing that was committed.

Three entry points, one body (`run_progressive`, plain wiring over the tasks):
- `progressive`: the flow deployments serve and the UI's run form shows; flat parameters, one per flag of
  `tierprune run`, turned into the config by `config_from_flags`, checked like the CLI checks them.
- `progressive_from_config`: the same flow (same name) taking a ready TierpruneConfig, for the CLI and tests.
Both hold the device's GPU slot (flows.gpu_slots) for the whole run.
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from tierprune.config import TierpruneConfig, config_from_flags
from tierprune.flows.gpu_slots import device_slot
from tierprune.flows.parameters import (
    RUN_NAME_TEMPLATE, BlockSize, Calib, CalibBatchSize, CalibSamples, CalibSeqlen, Compile, Device, Dtype, Eval,
    EvalBatchSize, EvalMaxWindows, EvalSeqlen, Export, FtBatchSize, FtCommitEvery, FtCommitMinutes, FtCompile, FtData,
    FtEvalEvery, FtFade, FtGradAccum, FtLr, FtMethod, FtPatience, FtSchedule, FtSeqlen, FtTokens, FtTrain, FtWarmup,
    GgufFile, KdCacheTopk, KdHiddenWeight, KdTemperature, KdWeight, KeepCheckpoints, LoraRank, LoraTargets, Model,
    ObsUpdate, Offload, Plan, ResumeFrom, Run, Saliency, Scope, Seed, Select, Store, Topk, ZeroShot, ZeroShotInclude,
    ZeroShotLimit, described, flow_run_name,
)
from tierprune.tasks.collect_activations import collect_activations_task
from tierprune.tasks.demote import demote_task
from tierprune.tasks.evaluate import evaluate_task
from tierprune.tasks.export import export_task
from tierprune.tasks.finetune import finetune_task
from tierprune.tasks.keep_checkpoints import keep_checkpoints_task
from tierprune.tasks.record import record_iteration_task
from tierprune.tasks.report import report_task
from tierprune.tasks.run_state import RunState, open_run, run_lock
from tierprune.tasks.score_blocks import score_blocks_task
from tierprune.tasks.start import dense_start_task, finished_start_task, resume_start_task


def run_progressive(cfg: TierpruneConfig, export: str | None = None) -> list[dict]:
    """Run (or resume) a progressive three-tier run; returns one summary row per iteration.

    export: a folder (or fsspec URL) that receives the last iteration as a model folder once the plan is done.
    Undecorated, so that both flows below share it; call it inside a flow run (its steps are tasks).
    """
    logger = get_run_logger()
    state = RunState(cfg)
    rows = []
    with run_lock(state):
        open_run(state)
        # A run whose older checkpoints were deleted goes on after its last finished iteration, not from iteration 0.
        finished = finished_start_task(state)
        rows += [row for _, _, row in finished]
        if finished:
            start, refs, _ = finished[-1]
            checkpoint, tiers = refs["checkpoint"], refs["tiers"]
        elif cfg.run.resume_from:
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
            if cfg.run.keep_checkpoints:
                keep_checkpoints_task(state, cfg.run.keep_checkpoints)
        if export:
            state.release_models()  # the export loads the finished iteration on its own
            done = export_task(state, export)
            logger.info("exported iteration %d to %s", done["iteration"], done["output"])
    return rows


@flow(name="progressive", log_prints=False)
def progressive_from_config(cfg: TierpruneConfig, export: str | None = None) -> list[dict]:
    """The progressive flow over a ready config (the CLI checked it before Prefect started)."""
    with device_slot(cfg.device):
        return run_progressive(cfg, export)


@flow(name="progressive", log_prints=False)
@described
def progressive(
    plan: Plan = "smoke",
    store: Store = "runs",
    run: Run = RUN_NAME_TEMPLATE,
    resume_from: ResumeFrom = None,
    keep_checkpoints: KeepCheckpoints = None,
    model: Model = "smollm2-135m",
    gguf_file: GgufFile = None,
    dtype: Dtype = "auto",
    block_size: BlockSize = 16,
    topk: Topk = 10,
    select: Select = "wanda",
    scope: Scope = "matrix",
    saliency: Saliency = "wanda",
    calib: Calib = None,
    calib_samples: CalibSamples = 128,
    calib_seqlen: CalibSeqlen = 2048,
    calib_batch_size: CalibBatchSize = 8,
    seed: Seed = 0,
    compile: Compile = False,
    eval: Eval = None,
    eval_seqlen: EvalSeqlen = 2048,
    eval_max_windows: EvalMaxWindows = None,
    eval_batch_size: EvalBatchSize = 1,
    zero_shot: ZeroShot = None,
    zero_shot_limit: ZeroShotLimit = None,
    zero_shot_include: ZeroShotInclude = None,
    device: Device = "cpu",
    offload: Offload = False,
    ft_method: FtMethod = "full",
    ft_data: FtData = None,
    ft_tokens: FtTokens = 2_457_600,
    ft_seqlen: FtSeqlen = 512,
    ft_batch_size: FtBatchSize = 16,
    ft_lr: FtLr = 1e-3,
    ft_grad_accum: FtGradAccum = 1,
    ft_schedule: FtSchedule = "cosine",
    ft_warmup: FtWarmup = 0.05,
    ft_train: FtTrain = "linears",
    ft_commit_every: FtCommitEvery = None,
    ft_commit_minutes: FtCommitMinutes = 10.0,
    ft_eval_every: FtEvalEvery = 0,
    ft_patience: FtPatience = 0,
    ft_compile: FtCompile = False,
    ft_fade: FtFade = 0.0,
    obs_update: ObsUpdate = False,
    kd_weight: KdWeight = 1.0,
    kd_temperature: KdTemperature = 1.0,
    kd_hidden_weight: KdHiddenWeight = 0.0,
    kd_cache_topk: KdCacheTopk = 0,
    lora_rank: LoraRank = 16,
    lora_targets: LoraTargets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    export: Export = None,
) -> list[dict]:
    """Progressive three-tier pruning: Dense → 2:4 → TopK blocks, iteration by iteration as the plan says.

    Rerunning with the same run name and settings resumes the run; resume_from starts a new run after a
    finished iteration of another one; keep_checkpoints deletes older iterations' checkpoints as the run goes.
    """
    flags = dict(locals())  # exactly the parameters above (first statement): the flags of `tierprune run`
    from tierprune.tasks.export import check_export_target, export_path
    from tierprune.tasks.run_state import NothingToDo, check_run_inputs

    export = flags.pop("export")
    flags["run"] = flow_run_name(run)
    cfg = config_from_flags(**flags)
    try:
        warnings = check_run_inputs(cfg)  # bad input fails the run in seconds, with the CLI's one-line message
    except NothingToDo as exc:
        get_run_logger().info("%s", exc)
        return []
    for warning in warnings:
        get_run_logger().warning("%s", warning)
    if export:
        export = export_path(export, cfg.run.name, flag="export")
        check_export_target(export, cfg.model, flag="export")  # now, not after hours of training
    with device_slot(cfg.device):
        return run_progressive(cfg, export)


if __name__ == "__main__":
    import sys

    # A tiny preset: the embedded SmolLM2, the smoke plan, a local store, a quick look at the numbers.
    progressive(plan="smoke", store=sys.argv[1] if len(sys.argv) > 1 else "runs", run="smoke", calib_samples=16,
                calib_seqlen=512, eval_seqlen=512, eval_max_windows=16)
