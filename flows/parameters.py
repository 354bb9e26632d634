"""The flat flow parameters: one typed, described field per command-line flag (its snake_case name).

Prefect renders a deployment's parameters as the UI's run form from the flow's signature. Each flow in
flows/ writes its signature with these aliases, so a field's type, choices and description are written
once; the defaults sit in the signatures and equal `config_from_flags`'s (a test checks names and
defaults against it, so the form and the CLI cannot drift apart).

`expand_run_name` turns a run-name template such as `{flow}-{date}` into a name, from the flow run's
scheduled time: a nightly run gets a fresh run, and a retry of the same scheduled run resumes it.
"""
from __future__ import annotations

import datetime as dt
import inspect
import re
import string
import typing
from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

from pydantic import Field
from pydantic.fields import FieldInfo

from tierprune.errors import TierpruneError

__all__ = ["RUN_NAME_TEMPLATE", "expand_run_name", "flow_run_name", "described", "Plan", "Store", "Run", "ResumeFrom",
           "KeepCheckpoints", "Export", "Model", "GgufFile", "Dtype",
           "Method", "Pattern", "Sparsity", "BlockSize", "Tiers", "Topk", "Select", "Scope", "Saliency", "Calib",
           "CalibSamples", "CalibSeqlen", "CalibBatchSize", "Seed", "Compile", "Eval", "EvalSeqlen",
           "EvalMaxWindows", "EvalBatchSize", "ZeroShot", "ZeroShotLimit", "ZeroShotInclude", "Device", "Offload", "FtMethod", "FtData", "FtTokens", "FtSeqlen",
           "FtBatchSize", "FtLr", "FtGradAccum", "FtSchedule", "FtWarmup", "FtTrain", "FtCommitEvery",
           "FtCommitMinutes", "FtEvalEvery", "FtPatience", "FtCompile", "FtFade", "ObsUpdate", "KdWeight", "KdTemperature",
           "KdHiddenWeight", "KdCacheTopk",
           "LoraRank", "LoraTargets"]

# With the time: two runs launched from the form on one day are two runs, not one refused as "other settings".
RUN_NAME_TEMPLATE = "{flow}-{date}-{time}"

# ---- the progressive run: plan, store, run, resume --------------------------------------------------------
Plan = Annotated[str, Field(description="The plan: the name of a plan shipped in schedules/plans (smoke, "
                                        "llama2-5iter), a path or URL of a CSV/YAML/JSON plan, or CSV text")]
Store = Annotated[str, Field(description="Where runs live, on the machine that runs the flow: a folder, file://, "
                                         "memory://, s3://, gs://")]
Run = Annotated[str, Field(description="The run's folder name under the store; {flow}, {deployment}, {date} "
                                       "(YYYY-MM-DD) and {time} (HHMM) are filled in from the scheduled start. "
                                       "The same name with the same settings resumes that run")]
ResumeFrom = Annotated[str | None, Field(description="Start after a finished iteration of any run: "
                                                     "STORE/RUN/iter-00K (its tier map and checkpoint)")]
KeepCheckpoints = Annotated[int | None, Field(ge=1, description=(
    "Keep the checkpoints of only the last N finished iterations: older ones are deleted as the run goes (as "
    "`tierprune runs prune --keep-last N`; records, tier maps and evaluations stay). Empty: keep every one"))]
Export = Annotated[str | None, Field(description="Once the plan is done, write its last iteration as a model "
                                                 "folder plain transformers loads (as `tierprune runs export`): a "
                                                 "folder or URL on the machine that runs the flow; {run} "
                                                 "becomes the run's name (a folder per scheduled run)")]

# ---- the model and the pruning -----------------------------------------------------------------------------
Model = Annotated[str, Field(description="Hub id, local directory, .gguf file, or the alias smollm2-135m")]
GgufFile = Annotated[str | None, Field(description="GGUF file inside the model's directory or hub repo")]
Dtype = Annotated[Literal["auto", "float32", "bfloat16", "float16"],
                  Field(description="Working dtype: auto is bfloat16 on CUDA, float32 on the CPU")]
Method = Annotated[Literal["wanda", "magnitude", "sparsegpt", "none"], Field(description="Pruning method")]
# The CLI takes any N:M; the form offers the usual ones.
Pattern = Annotated[Literal["unstructured", "2:4", "4:8", "block", "tiers"],
                    Field(description="Sparsity pattern (N:M keeps N of every M along the input dimension)")]
Sparsity = Annotated[float, Field(ge=0.0, lt=1.0, description="Fraction pruned (unstructured, block, sparsegpt)")]
BlockSize = Annotated[int, Field(ge=1, description="Block edge for the block and tiers patterns")]
Tiers = Annotated[str, Field(description="dense,2:4,topk fractions of blocks (tiers pattern), e.g. 0.35,0.45,0.20")]
Topk = Annotated[int, Field(ge=0, description="Weights kept per TopK block (0: TopK blocks are removed entirely)")]
Select = Annotated[Literal["wanda", "magnitude"],
                   Field(description="Survivors inside 2:4/TopK blocks: by Wanda score or by magnitude")]
Scope = Annotated[Literal["matrix", "global"],
                  Field(description="Tier fractions per matrix, or ranked over the whole model")]
Saliency = Annotated[Literal["wanda", "fisher"],
                     Field(description="What blocks are ranked by: Wanda |W|·sqrt(S), or fisher |W|·sqrt(F) with F "
                                       "the mean squared gradient of the previous iteration's full fine-tuning "
                                       "(the first iteration uses Wanda)")]

# ---- data ----------------------------------------------------------------------------------------------------
Calib = Annotated[str | None, Field(description="Calibration data spec (c4, c4:PATH, wikitext2:DIR, text:GLOB); "
                                                "empty: c4, or the local copy under $TIERPRUNE_DATA")]
CalibSamples = Annotated[int, Field(ge=1, description="Calibration sequences")]
CalibSeqlen = Annotated[int, Field(ge=2, description="Tokens per calibration sequence")]
CalibBatchSize = Annotated[int, Field(ge=1, description="Sequences per forward pass (speed only)")]
Seed = Annotated[int, Field(description="Calibration sampling seed")]
Compile = Annotated[bool, Field(description="torch.compile the layers during calibration (faster on a GPU)")]
Eval = Annotated[str | None, Field(description="Evaluation data spec, or none to skip; empty: wikitext2, or the "
                                               "local copy under $TIERPRUNE_DATA")]
EvalSeqlen = Annotated[int, Field(ge=2, description="Tokens per evaluation window")]
EvalMaxWindows = Annotated[int | None, Field(ge=1, description="Cap on evaluation windows (quick runs); empty: all")]
EvalBatchSize = Annotated[int, Field(ge=1, description="Windows per forward pass (speed only)")]
ZeroShot = Annotated[str | None, Field(description="lm-eval tasks for zero-shot accuracy, comma separated; wanda = "
                                                   "Wanda's seven; empty: none")]
ZeroShotLimit = Annotated[int | None, Field(ge=1, description="Score only the first N items of each zero-shot task "
                                                              "(quick runs); empty: all")]
ZeroShotInclude = Annotated[str | None, Field(description="A folder of your own lm-eval task YAMLs")]

# ---- where it runs ---------------------------------------------------------------------------------------------
Device = Annotated[Literal["cpu", "cuda", "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:4", "cuda:5", "cuda:6",
                           "cuda:7"],
                   Field(description="Where the model computes; one run at a time per GPU (a global "
                                     "concurrency limit per device)")]
Offload = Annotated[bool, Field(description="Keep the model in CPU memory: calibration and evaluation stream the "
                                            "decoder layers that do not fit through the device (models larger "
                                            "than the device; a progressive run cannot fine-tune then)")]

# ---- recovery fine-tuning (the flags of `tierprune run`) ------------------------------------------------------
FtMethod = Annotated[Literal["none", "full", "lora"],
                     Field(description="Recovery fine-tuning after each demotion: none, masked full, or LoRA")]
FtData = Annotated[str | None, Field(description="Fine-tuning data spec; empty: the calibration corpus minus the "
                                                 "documents the calibration draw used")]
FtTokens = Annotated[int, Field(ge=0, description="Training tokens per plan epoch (an iteration trains the plan's "
                                                  "epochs × this)")]
FtSeqlen = Annotated[int, Field(ge=2, description="Tokens per training window")]
FtBatchSize = Annotated[int, Field(ge=1, description="Windows per forward pass")]
FtLr = Annotated[float, Field(gt=0.0, description="Learning rate")]
FtGradAccum = Annotated[int, Field(ge=1, description="Forward passes per optimizer step")]
FtSchedule = Annotated[Literal["constant", "cosine", "linear"],
                       Field(description="Learning-rate schedule after the warm-up")]
FtWarmup = Annotated[float, Field(ge=0.0, lt=1.0, description="Warm-up as a fraction of an iteration's steps")]
FtTrain = Annotated[Literal["linears", "all_but_embeddings", "all"],
                    Field(description="What full fine-tuning updates")]
FtCommitEvery = Annotated[int | None, Field(ge=0, description="Optimizer steps between committed training states "
                                                              "(a killed run resumes from the last one); 0: none; "
                                                              "empty: by time (ft_commit_minutes)")]
FtCommitMinutes = Annotated[float, Field(ge=0, description="Minutes of training between committed training states "
                                                           "when ft_commit_every is empty; 0: none")]
FtEvalEvery = Annotated[int, Field(ge=0, description="Optimizer steps between held-out losses during fine-tuning; "
                                                     "0: only at the start and the end")]
FtPatience = Annotated[int, Field(ge=0, description="Held-out evaluations without improvement before fine-tuning "
                                                    "stops early (needs ft_eval_every); 0: never")]
FtCompile = Annotated[bool, Field(description="torch.compile the training forwards (faster on a GPU, after a "
                                             "compile of tens of seconds)")]
FtFade = Annotated[float, Field(ge=0.0, le=1.0, description="Fraction of an iteration's optimizer steps over which "
                                                         "the weights its demotion removes fade to zero; 0: removed "
                                                         "at once")]
ObsUpdate = Annotated[bool, Field(description="At each demotion, update the kept weights SparseGPT-style (OBS, from "
                                             "the calibration windows) to make up for the removed ones")]
KdWeight = Annotated[float, Field(ge=0.0, le=1.0, description="Distillation from the dense model: 0 = "
                                                              "cross-entropy only, 1 = distillation only")]
KdTemperature = Annotated[float, Field(gt=0.0, description="Softmax temperature of the logit distillation")]
KdHiddenWeight = Annotated[float, Field(ge=0.0, description="Weight of a per-layer hidden-state loss against the dense "
                                                            "model, added to the objective; 0: none")]
KdCacheTopk = Annotated[int, Field(ge=0, description="0 = the teacher runs beside the student; K = its top-K "
                                                     "logits per position are stored first and the teacher freed "
                                                     "(memory short)")]
LoraRank = Annotated[int, Field(ge=1, description="LoRA rank")]
LoraTargets = Annotated[str, Field(description="Comma-separated module-name suffixes LoRA adapts, e.g. "
                                               "q_proj,v_proj")]


F = TypeVar("F", bound=Callable)


def described(fn: F) -> F:
    """Append an `Args:` section with each parameter's description to fn's docstring (use under @flow).

    Prefect's form takes a parameter's description from the docstring (or from a `Field` default), not from
    `Annotated[..., Field(description=...)]`, whose constraints and choices it does keep; this writes the
    aliases' descriptions where Prefect reads them, so they stay written once.
    """
    hints = typing.get_type_hints(fn, include_extras=True)
    lines = []
    for name in inspect.signature(fn).parameters:
        meta = getattr(hints.get(name), "__metadata__", ())
        description = next((m.description for m in meta if isinstance(m, FieldInfo) and m.description), None)
        if description:
            lines.append(f"    {name}: {description}")
    if lines:
        fn.__doc__ = "\n".join([inspect.cleandoc(fn.__doc__ or ""), "", "Args:", *lines])
    return fn


_FIELDS = {"flow", "deployment", "date", "time"}


def expand_run_name(template: str, *, flow: str, deployment: str | None, when: dt.datetime) -> str:
    """A run name from a template: {flow}, {deployment} (the flow's name when there is none), {date}, {time}."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise TierpruneError(f"run name template {template!r}: {exc}") from None
    unknown = fields - _FIELDS
    if unknown:
        raise TierpruneError(f"run name template {template!r}: unknown field(s) "
                             f"{', '.join(sorted(unknown))}; use {{flow}}, {{deployment}}, {{date}}, {{time}}")
    # A deployment's name may hold characters a run folder may not (spaces, slashes); what the user typed is
    # left as it is, so that the run store refuses a bad name with its own message.
    safe = {key: re.sub(r"[^A-Za-z0-9._-]+", "-", value) for key, value in
            {"flow": flow, "deployment": deployment or flow}.items()}
    return template.format(**safe, date=when.strftime("%Y-%m-%d"), time=when.strftime("%H%M"))


def flow_run_name(template: str) -> str:
    """expand_run_name for the flow run in progress: its flow, deployment and scheduled start (local time).

    The scheduled start, not the clock: a retry of last night's run gets last night's name and resumes it.
    """
    from prefect.runtime import deployment, flow_run

    when = flow_run.scheduled_start_time or dt.datetime.now(dt.timezone.utc)
    return expand_run_name(template, flow=flow_run.flow_name or "flow", deployment=deployment.name,
                           when=when.astimezone())
