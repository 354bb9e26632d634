"""One pydantic family for every setting; tasks get only their own sub-config."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import TierpruneError

DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?")  # what --device takes

__all__ = [
    "ModelConfig",
    "CalibrationConfig",
    "PruneConfig",
    "EvalConfig",
    "WANDA_ZERO_SHOT_TASKS",
    "FinetuneConfig",
    "RunConfig",
    "TierpruneConfig",
    "config_from_flags",
    "parse_fractions",
    "one_line",
    "parse_zero_shot",
]

_NM = re.compile(r"^(\d+):(\d+)$")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Frozen):
    name: str = "smollm2-135m"  # hub id, local directory, .gguf path or alias
    gguf_file: str | None = None
    dtype: str = "auto"


class CalibrationConfig(_Frozen):
    data: str = "c4"  # dataset spec, see tierprune.storage.datasets
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0
    batch_size: int = Field(8, ge=1)  # sequences per forward; changes speed, not results
    compile: bool = False  # torch.compile the layers (Wanda); S differs from the reference by rounding only


class PruneConfig(_Frozen):
    method: Literal["wanda", "magnitude", "sparsegpt", "none"] = "wanda"
    pattern: str = "unstructured"  # unstructured | N:M | block | tiers
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, allow_inf_nan=False)
    block_size: int = Field(16, ge=1)
    tiers: tuple[float, float, float] = (0.35, 0.45, 0.20)  # dense, 2:4, topk fractions of blocks
    topk: int = Field(10, ge=0)  # weights kept per TopK block
    select: Literal["wanda", "magnitude"] = "wanda"  # chooses survivors inside 2:4 / TopK blocks
    scope: Literal["matrix", "global"] = "matrix"  # tier fractions per matrix or over the whole model
    # What a progressive run ranks blocks and survivors by: Wanda's |W|·sqrt(S), or |W|·sqrt(F) with F the
    # mean squared gradient the previous iteration's fine-tuning measured (AdamW's second moment).
    saliency: Literal["wanda", "fisher"] = "wanda"

    @field_validator("pattern")
    @classmethod
    def _known_pattern(cls, v: str) -> str:
        if v in ("unstructured", "block", "tiers"):
            return v
        match = _NM.match(v)
        if not match:
            raise ValueError(f"unknown pattern {v!r}: use unstructured, N:M (e.g. 2:4), block or tiers")
        n, m = map(int, match.groups())
        if not 0 < n < m:
            raise ValueError(f"pattern {v!r} must keep 0 < N < M weights of every M")
        return v

    @field_validator("tiers")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 or f > 1 for f in v):
            raise ValueError(f"tier fractions must lie in [0, 1], got {','.join(map(str, v))}")
        if abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"tier fractions must sum to 1, got {','.join(map(str, v))} (sum {sum(v):g})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        if self.pattern == "tiers":
            if self.block_size % 4:
                raise ValueError(f"tiers need a block size divisible by 4 (2:4 groups), got {self.block_size}")
            if self.topk > self.block_size ** 2:
                raise ValueError(f"--topk {self.topk} exceeds the {self.block_size ** 2} weights of a block")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        match = _NM.match(self.pattern)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("wanda", "sparsegpt")


# The zero-shot tasks of Wanda's tables, as lm-eval-harness names them ("wanda" on the command line).
WANDA_ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


class EvalConfig(_Frozen):
    data: str | None = "wikitext2"
    seqlen: int = Field(2048, ge=2)
    max_windows: int | None = Field(None, ge=1)  # cap for quick runs; always reported
    batch_size: int = Field(1, ge=1)
    zero_shot: tuple[str, ...] = ()  # lm-eval task names, 0-shot accuracy on the in-memory model
    zero_shot_limit: int | None = Field(None, ge=1)  # first N items of each task, for quick runs; always reported
    zero_shot_include: str | None = None  # a folder of the user's lm-eval task YAMLs

    @field_validator("zero_shot")
    @classmethod
    def _task_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name or name != name.strip() or "," in name for name in v):
            raise ValueError(f"zero-shot task names must be non-empty, without spaces or commas: {list(v)}")
        return tuple(dict.fromkeys(v))

    @model_validator(mode="after")
    def _zero_shot_settings_need_tasks(self) -> EvalConfig:
        if not self.zero_shot and (self.zero_shot_limit is not None or self.zero_shot_include is not None):
            raise ValueError("--zero-shot-limit and --zero-shot-include need --zero-shot TASKS")
        return self


LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinetuneConfig(_Frozen):
    """How each iteration recovers after its demotion (tasks.training); the plan's `epochs` scales the budget."""

    method: Literal["none", "full", "lora"] = "full"
    data: str | None = None  # dataset spec of the corpus; None = the calibration corpus minus its drawn documents
    tokens_per_epoch: int = Field(2_457_600, ge=0)  # N: an iteration trains plan-epochs × N tokens (300 × 16 × 512)
    seqlen: int = Field(512, ge=2)
    batch_size: int = Field(16, ge=1)  # windows per forward
    grad_accum: int = Field(1, ge=1)  # forwards per optimizer step
    # lr 1e-3, cosine after a 5% warm-up: the best of the H200 sweep at 3.07 M tokens (README, quality study),
    # ppl 51.5 against 55.2 at 3e-4 cosine and 57.9 at the probe's constant 1e-4, for progressive and one-shot alike.
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warm-up; cosine/linear decay to 0
    warmup_steps: int = Field(0, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)  # of the iteration's steps; used when warmup_steps is 0
    kd_weight: float = Field(1.0, ge=0, le=1)  # 0 = cross-entropy only, 1 = distillation only
    kd_temperature: float = Field(1.0, gt=0)
    hidden_weight: float = Field(0.0, ge=0)  # per-layer hidden-state loss on top (needs the teacher model)
    # Memory short: the teacher's top-k logits per position are computed first and stored in the run store,
    # and the teacher is freed before the student trains (KD against its renormalised top k).
    teacher_cache: bool = False
    teacher_topk: int = Field(64, ge=1)
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    lora_targets: tuple[str, ...] = LLAMA_LINEARS  # module-name suffixes, as peft's target_modules
    train: Literal["linears", "all_but_embeddings", "all"] = "linears"  # what full fine-tuning updates
    seed: int = 0
    val_windows: int = Field(8, ge=0)  # held-out windows (the eval corpus' validation split) for the loss curve
    eval_every: int = Field(0, ge=0)  # optimizer steps between held-out losses; 0 = only at start and end
    patience: int = Field(0, ge=0)  # evaluations without improvement before stopping; 0 = never stop early
    # When training commits its state (weights plus AdamW's two moments: ~1.3 GB for a 135M model, seconds
    # each): every `commit_every` optimizer steps when given (0 = never), else every `commit_minutes` of
    # training (0 = never). By time by default: a fixed step count of 100 commits every ~10 s on an H200
    # (17 states in the 5-iteration study run, README) and every few minutes on a CPU.
    commit_every: int | None = Field(None, ge=0)
    commit_minutes: float = Field(10.0, ge=0, allow_inf_nan=False)
    # torch.compile the training forwards (student and live teacher): a small model's step is bound by
    # kernel launches on a GPU; costs a compile (tens of seconds) once per process and model shape.
    compile: bool = False
    # Gradual demotion: the weights a demotion removes fade linearly to zero over this fraction of the
    # iteration's optimizer steps (frozen while they fade) instead of vanishing before the first step;
    # 0 = removed at once. The masks are exact from the end of the fade on, and always in the checkpoint.
    fade_fraction: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    # Compensated demotion (tasks.compensate): the kept weights take SparseGPT's OBS update for the removed
    # ones, from the calibration windows' per-layer Gram matrices, before training (or instead of it).
    obs_update: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.warmup_steps and "warmup_fraction" in self.model_fields_set and self.warmup_fraction:
            raise ValueError("give warmup_steps or warmup_fraction, not both")
        if self.method == "lora" and not self.lora_targets:
            raise ValueError("LoRA needs at least one target module suffix (--lora-targets)")
        if self.patience and not self.eval_every:
            raise ValueError("early stopping (--ft-patience) needs held-out losses: set --ft-eval-every > 0")
        if self.fade_fraction and self.method == "none":
            raise ValueError("fading (--ft-fade) happens during fine-tuning, and --ft-method none trains nothing")
        if self.obs_update and self.fade_fraction:
            raise ValueError("--obs-update makes up for the removed weights at once, --ft-fade removes them "
                             "gradually; use one of them")
        if self.teacher_cache and self.hidden_weight:
            raise ValueError("the hidden-state loss (--kd-hidden-weight) needs the teacher model, not its cached "
                             "logits (--kd-cache-topk)")
        return self


class RunConfig(_Frozen):
    """Where a progressive run lives and what it follows; None in TierpruneConfig for one-shot pruning."""

    plan: str  # path/URL of the plan (CSV, YAML or JSON)
    store: str  # fsspec root of runs: a path, file://, memory://, s3://, gs://
    name: str  # the run's folder name under `store`
    resume_from: str | None = None  # an iteration folder of any run: start after it, from its tiers + checkpoint
    # Delete the checkpoints of all finished iterations but the last N as the run goes (None: keep every one).
    # Not part of the run's identity: it changes no result, and a resume may choose another N.
    keep_checkpoints: int | None = Field(None, ge=1)


class TierpruneConfig(_Frozen):
    """Every setting of a one-shot prune or a progressive run; each step gets only its own slice."""

    model: ModelConfig = ModelConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    prune: PruneConfig = PruneConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig | None = None  # set for progressive runs
    finetune: FinetuneConfig = FinetuneConfig()  # recovery between iterations (progressive runs)
    device: str = "cpu"
    offload: bool = False  # keep the model on the CPU and stream layers through the device

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_NAME.fullmatch(v):
            raise ValueError(f"unknown device {v!r}: use cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _progressive(self) -> TierpruneConfig:
        if self.run is not None and (self.prune.method, self.prune.pattern) != ("wanda", "tiers"):
            raise ValueError("a progressive run prunes with method wanda and pattern tiers")
        if self.prune.saliency == "fisher" and (self.run is None or self.finetune.method != "full"):
            raise ValueError("--saliency fisher ranks by the gradients of full fine-tuning between iterations: "
                             "it needs a progressive run with --ft-method full")
        return self


# (config class, field) -> the flag that sets it, so that a refused value names what the user typed
# (fine-tuning's are _FINETUNE_FLAGS).
_FLAGS = {
    ("ModelConfig", "name"): "--model", ("ModelConfig", "gguf_file"): "--gguf-file", ("ModelConfig", "dtype"): "--dtype",
    ("CalibrationConfig", "data"): "--calib", ("CalibrationConfig", "nsamples"): "--calib-samples",
    ("CalibrationConfig", "seqlen"): "--calib-seqlen", ("CalibrationConfig", "seed"): "--seed",
    ("CalibrationConfig", "batch_size"): "--calib-batch-size",
    ("PruneConfig", "method"): "--method", ("PruneConfig", "pattern"): "--pattern",
    ("PruneConfig", "sparsity"): "--sparsity", ("PruneConfig", "block_size"): "--block-size",
    ("PruneConfig", "tiers"): "--tiers", ("PruneConfig", "topk"): "--topk", ("PruneConfig", "select"): "--select",
    ("PruneConfig", "scope"): "--scope", ("PruneConfig", "saliency"): "--saliency",
    ("EvalConfig", "data"): "--eval", ("EvalConfig", "seqlen"): "--eval-seqlen",
    ("EvalConfig", "max_windows"): "--eval-max-windows", ("EvalConfig", "batch_size"): "--eval-batch-size",
    ("EvalConfig", "zero_shot"): "--zero-shot", ("EvalConfig", "zero_shot_limit"): "--zero-shot-limit",
    ("EvalConfig", "zero_shot_include"): "--zero-shot-include",
    ("RunConfig", "plan"): "--plan", ("RunConfig", "store"): "--store", ("RunConfig", "name"): "--run",
    ("RunConfig", "resume_from"): "--resume-from", ("RunConfig", "keep_checkpoints"): "--keep-checkpoints",
    ("TierpruneConfig", "device"): "--device",
}


def one_line(exc: ValidationError) -> str:
    """The first validation problem as one readable line, naming the flag where one sets the field."""
    err = exc.errors()[0]
    loc = err.get("loc", ())
    where = _FLAGS.get((exc.title, str(loc[0]))) if len(loc) == 1 else None
    where = where or ".".join(str(p) for p in loc)
    msg = err.get("msg", str(exc)).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'0.35,0.45,0.20' -> (0.35, 0.45, 0.2); a clear error for anything else."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise TierpruneError(f"--tiers must be three numbers like 0.35,0.45,0.20, got {text!r}") from None
    if len(values) != 3:
        raise TierpruneError(f"--tiers needs three fractions (dense,2:4,topk), got {len(values)}: {text!r}")
    return values  # type: ignore[return-value]


def parse_zero_shot(text: str | None) -> tuple[str, ...]:
    """'wanda' -> Wanda's seven tasks; 'boolq,rte' -> ('boolq', 'rte'); 'wanda' may stand in a list; None -> ()."""
    if text is None or not text.strip():
        return ()
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise TierpruneError(f"--zero-shot wants a comma list of lm-eval task names or 'wanda', got {text!r}")
        names += WANDA_ZERO_SHOT_TASKS if part == "wanda" else [part]
    return tuple(dict.fromkeys(names))
def parse_names(text: str, flag: str) -> tuple[str, ...]:
    """'q_proj, v_proj' -> ('q_proj', 'v_proj'); a clear error for an empty list."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise TierpruneError(f"{flag} needs at least one name, got {text!r}")
    return names


_DEFAULT_SPARSITY = 0.5  # of --sparsity; N:M and tier patterns set their own

# FinetuneConfig field -> the flag that sets it, so that a refused value names what the user typed.
_FINETUNE_FLAGS = {
    "method": "--ft-method", "data": "--ft-data", "tokens_per_epoch": "--ft-tokens", "seqlen": "--ft-seqlen",
    "batch_size": "--ft-batch-size", "lr": "--ft-lr", "kd_weight": "--kd-weight",
    "kd_temperature": "--kd-temperature", "hidden_weight": "--kd-hidden-weight", "lora_rank": "--lora-rank",
    "lora_targets": "--lora-targets", "grad_accum": "--ft-grad-accum", "schedule": "--ft-schedule",
    "warmup_fraction": "--ft-warmup", "train": "--ft-train", "commit_every": "--ft-commit-every",
    "commit_minutes": "--ft-commit-minutes",
    "eval_every": "--ft-eval-every", "patience": "--ft-patience", "teacher_cache": "--kd-cache-topk",
    "teacher_topk": "--kd-cache-topk", "compile": "--ft-compile", "fade_fraction": "--ft-fade",
    "obs_update": "--obs-update",
}


def _finetune_config(**fields) -> FinetuneConfig:
    try:
        return FinetuneConfig(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err.get("loc", ())
        flag = _FINETUNE_FLAGS.get(str(loc[0])) if loc else None
        message = err.get("msg", str(exc)).removeprefix("Value error, ")
        raise TierpruneError(f"{flag}: {message}" if flag else f"fine-tuning: {message}") from None


def config_from_flags(
    *, model: str = "smollm2-135m", gguf_file: str | None = None, dtype: str = "auto",
    method: str = "wanda", pattern: str = "unstructured", sparsity: float = _DEFAULT_SPARSITY, block_size: int = 16,
    tiers: str = "0.35,0.45,0.20", topk: int = 10, select: str = "wanda", scope: str = "matrix",
    saliency: str = "wanda",
    calib: str | None = None, calib_samples: int = 128, calib_seqlen: int = 2048, calib_batch_size: int = 8,
    seed: int = 0, compile: bool = False,
    eval: str | None = None, eval_seqlen: int = 2048, eval_max_windows: int | None = None, eval_batch_size: int = 1,
    device: str = "cpu", offload: bool = False,
    plan: str | None = None, store: str | None = None, run: str | None = None, resume_from: str | None = None,
    keep_checkpoints: int | None = None,
    ft_method: str = "full", ft_data: str | None = None, ft_tokens: int = 2_457_600, ft_seqlen: int = 512,
    ft_batch_size: int = 16, ft_lr: float = 1e-3, kd_weight: float = 1.0, lora_rank: int = 16,
    lora_targets: str = ",".join(LLAMA_LINEARS), ft_grad_accum: int = 1, ft_schedule: str = "cosine",
    ft_warmup: float = 0.05, ft_train: str = "linears", ft_commit_every: int | None = None,
    ft_commit_minutes: float = 10.0, ft_eval_every: int = 0,
    ft_patience: int = 0, kd_cache_topk: int = 0, ft_compile: bool = False, ft_fade: float = 0.0,
    obs_update: bool = False, kd_temperature: float = 1.0, kd_hidden_weight: float = 0.0,
    zero_shot: str | None = None, zero_shot_limit: int | None = None, zero_shot_include: str | None = None,
) -> TierpruneConfig:
    """The one mapping of the command-line flags (snake_case) to the config, for prune, run and the demo alike.

    `calib`/`eval` default to the hub's c4/wikitext2, or to the local copies under $TIERPRUNE_DATA; `eval`
    "none" skips evaluation. A `plan` makes it a progressive run (pattern tiers, which store and run it needs).
    """
    from .storage.datasets import default_data_spec

    progressive = plan is not None
    if progressive and (store is None or run is None):
        raise TierpruneError("a progressive run needs --plan, --store and --run")
    try:
        cfg = TierpruneConfig(
            model=ModelConfig(name=model, gguf_file=gguf_file, dtype=dtype),
            calibration=CalibrationConfig(data=calib or default_data_spec("c4"), nsamples=calib_samples,
                                          seqlen=calib_seqlen, seed=seed, batch_size=calib_batch_size,
                                          compile=compile),
            prune=PruneConfig(method="wanda" if progressive else method, pattern="tiers" if progressive else pattern,
                              sparsity=sparsity, block_size=block_size, tiers=parse_fractions(tiers), topk=topk,
                              select=select, scope=scope, saliency=saliency),
            eval=EvalConfig(data=None if eval == "none" else (eval or default_data_spec("wikitext2")),
                            seqlen=eval_seqlen, max_windows=eval_max_windows, batch_size=eval_batch_size,
                            zero_shot=parse_zero_shot(zero_shot), zero_shot_limit=zero_shot_limit,
                            zero_shot_include=zero_shot_include),
            run=RunConfig(plan=plan, store=store, name=run, resume_from=resume_from,
                          keep_checkpoints=keep_checkpoints) if progressive else None,
            finetune=_finetune_config(method=ft_method, data=ft_data, tokens_per_epoch=ft_tokens, seqlen=ft_seqlen,
                                      batch_size=ft_batch_size, lr=ft_lr, kd_weight=kd_weight,
                                      kd_temperature=kd_temperature, hidden_weight=kd_hidden_weight,
                                      lora_rank=lora_rank,
                                      lora_targets=parse_names(lora_targets, "--lora-targets"),
                                      grad_accum=ft_grad_accum, schedule=ft_schedule, warmup_fraction=ft_warmup,
                                      train=ft_train, commit_every=ft_commit_every,
                                      commit_minutes=ft_commit_minutes, eval_every=ft_eval_every,
                                      patience=ft_patience, seed=seed, teacher_cache=kd_cache_topk != 0,
                                      teacher_topk=kd_cache_topk or 64, compile=ft_compile,
                                      fade_fraction=ft_fade, obs_update=obs_update),
            device=device, offload=offload,
        )
    except ValidationError as exc:
        raise TierpruneError(one_line(exc)) from None
    _check_sparsity_applies(cfg.prune, sparsity)
    return cfg


def _check_sparsity_applies(prune: PruneConfig, sparsity: float) -> None:
    """N:M and tier patterns set their own sparsity: a --sparsity other than the default is refused, not dropped."""
    if sparsity == _DEFAULT_SPARSITY or prune.method == "none":
        return
    if prune.nm is not None:
        n, m = prune.nm
        implied = 1 - n / m
        if abs(sparsity - implied) > 1e-9:
            raise TierpruneError(f"--sparsity {sparsity:g} does not apply to --pattern {prune.pattern}, which prunes "
                                 f"{implied:g} of the weights; drop --sparsity")
    elif prune.pattern == "tiers":
        raise TierpruneError("--sparsity does not apply to --pattern tiers, whose --tiers fractions and --topk set "
                             "it; drop --sparsity")
