"""Step 4 of a progressive iteration: recover from the demotion by fine-tuning, keeping the stored masks exact.

The masks are the demote step's stored data (tasks.demote.keep_masks). The iteration trains
`epochs × --ft-tokens` tokens (the plan's column; 0 = only apply the masks) on the fine-tuning
corpus: the calibration corpus without the documents the calibration draw used, or `--ft-data`.
The teacher of distillation is the dense model as loaded. Every `commit_every` optimizer steps the
training state is committed to the store (`iter-NNN/trainstate-…`), so a run killed during
fine-tuning resumes from the last committed step; the states are dropped once the checkpoint is in.
The training itself is tasks.training (plain functions, no store).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from prefect import task
from torch import nn

from tierprune.adapters import weight_view
from tierprune.config import FinetuneConfig, TierpruneConfig
from tierprune.errors import TierpruneError
from tierprune.faults import crash_point
from tierprune.progress import report as report_progress

from .prune import named_linears
from .refs import ArtifactRef, committed_or_compute, step_key, store_cache_policy
from .score_blocks import FISHER_FILE
from .training import (
    TeacherTopK, TrainState, calibration_doc_indices, check_disjoint, corpus_stream, draw_windows, finetune_model_,
    iteration_tokens, masks_applied, teacher_topk_logits,
)

if TYPE_CHECKING:
    from .demote import PackedMasks
    from .run_state import RunState

__all__ = ["apply_masks_", "finetune_corpus", "check_finetune_data", "needs_training", "finetune_task"]

TRAIN_STATE = "trainstate"  # step name of the committed mid-training states
TEACHER_LOGITS = "teacher"  # step name of the cached top-k teacher logits (--kd-cache-topk)


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: PackedMasks) -> set[str]:
    """Zero, in place, every weight its module's keep mask removes; returns the names of the weights touched."""
    linears = named_linears(model)
    masks.check_covers(linears)
    for name, module in linears.items():
        W = weight_view(module)  # (out, in), in-place edits reach the module
        W.mul_(masks.mask_for(name, W))
    return {f"{name}.weight" for name in linears}


# ---------------------------------------------------------------------------------------------- data

def _corpus_spec(cfg: TierpruneConfig) -> str:
    return cfg.finetune.data or cfg.calibration.data


def needs_training(cfg: TierpruneConfig, epochs: float) -> bool:
    return iteration_tokens(cfg.finetune, epochs) >= cfg.finetune.seqlen


FEW_STEPS = 10  # below this many optimizer steps an iteration's warm-up rounds to nothing (5% of them)


def few_steps_warning(cfg: TierpruneConfig, plan_epochs: list[float]) -> str | None:
    """One line when an iteration trains so few optimizer steps at so high a learning rate that it tends to hurt.

    AdamW's first steps move every weight by about the learning rate, whatever its gradient: the default 1e-3
    is tuned for ~300 steps after a warm-up. Measured on SmolLM2-135M (CPU, smoke plan, --ft-tokens 81920: one
    step an iteration): ppl 43.8 before fine-tuning, 88.7 after. The demo's 8 steps at a constant 5e-4 help.
    """
    ft = cfg.finetune
    per_step = ft.batch_size * ft.grad_accum
    steps = [math.ceil(iteration_tokens(ft, e) // ft.seqlen / per_step) for e in plan_epochs if needs_training(cfg, e)]
    if not steps or min(steps) >= FEW_STEPS or ft.lr <= 5e-4:
        return None
    return (f"an iteration trains only {min(steps)} optimizer step(s) ({per_step} windows of {ft.seqlen} each) at "
            f"--ft-lr {ft.lr:g}: so few steps at this rate tend to make the model worse (on SmolLM2 one step took "
            f"ppl 43.8 to 88.7); give more --ft-tokens, or --ft-lr 5e-4 --ft-schedule constant --ft-warmup 0 "
            f"as the demo does")


def finetune_corpus(cfg: TierpruneConfig, tokenizer) -> tuple[torch.Tensor, dict]:
    """The fine-tuning tokens (T,) and what they are made of.

    With the default corpus (the calibration data) calibration stays the reference draw over all
    documents, and fine-tuning uses only the documents that draw never touched.
    """
    from tierprune.storage.datasets import load_texts

    spec = _corpus_spec(cfg)
    texts = load_texts(spec, "train")
    c = cfg.calibration
    drawn = calibration_doc_indices(texts, tokenizer, c.nsamples, c.seqlen, c.seed) if spec == c.data else []
    stream = corpus_stream(texts, tokenizer, drawn)
    return stream, {"corpus_documents": len(texts) - len(drawn), "calibration_documents_left_out": len(drawn),
                    "corpus_tokens": int(stream.numel())}


def check_finetune_data(cfg: TierpruneConfig, plan_epochs: list[float]) -> None:
    """Refuse (one line) a fine-tuning corpus that shares documents with the evaluation text; seconds, no model."""
    from tierprune.storage.datasets import check_data_spec, evaluation_split, held_out_split, load_texts

    if not any(needs_training(cfg, epochs) for epochs in plan_epochs):
        return
    spec = _corpus_spec(cfg)
    if cfg.finetune.data:
        check_data_spec(spec, "--ft-data")
    if cfg.eval.data:
        # Every document is checked, the calibration ones too: stricter than needed, and no tokenizer to load.
        check_disjoint(load_texts(spec, "train"), load_texts(cfg.eval.data, evaluation_split(cfg.eval.data)))
    if cfg.finetune.patience and cfg.finetune.val_windows and held_out_split(cfg.eval.data) is None:
        raise TierpruneError(f"--ft-patience stops on a held-out loss, and --eval {cfg.eval.data or '(none)'} has "
                             "no held-out split (a wikitext2 folder needs wiki.valid.raw); drop --ft-patience")


def _held_out_ids(cfg: TierpruneConfig, tokenizer) -> torch.Tensor | None:
    """The first `val_windows` windows of the evaluation corpus' held-out split (WikiText-2 valid), or None.

    None when the corpus has no such split (see held_out_split) or there is no evaluation data: the run then
    trains without a held-out loss curve, which only --ft-patience needs (refused up front without one).
    """
    from tierprune.storage.datasets import held_out_split, load_texts

    ft, spec = cfg.finetune, cfg.eval.data
    split = held_out_split(spec)
    if not ft.val_windows or split is None:
        return None
    ids = tokenizer("\n\n".join(load_texts(spec, split)), return_tensors="pt").input_ids[0]
    n = min(ft.val_windows, ids.numel() // ft.seqlen)
    return ids[: n * ft.seqlen].view(n, ft.seqlen) if n else None


# ----------------------------------------------------------------------------------------- the step

def _demoted_start(state: RunState, iteration: int, model: nn.Module, tokenizer, masks: PackedMasks) -> set[str]:
    """Apply the iteration's masks in place (with OBS updates of the kept weights under --obs-update); returns
    the names of the weights touched."""
    if not state.cfg.finetune.obs_update:
        return apply_masks_(model, masks)
    from .calibration import run_calibration_windows
    from .compensate import compensate_demotion_

    c = state.cfg.calibration
    masks.check_covers(named_linears(model))
    return compensate_demotion_(
        model, masks.mask_for, run_calibration_windows(state, tokenizer), batch_size=c.batch_size, device=state.cfg.device,
        offload=state.cfg.offload,
        on_progress=lambda d, t: report_progress(f"iteration {iteration}: OBS update", d, t))


def _ppl_before(state: RunState, iteration: int, model: nn.Module, tokenizer) -> float | None:
    """The perplexity of the freshly demoted model (masks applied, not trained yet), as evaluate measures it."""
    from .evaluate import _eval_ids, perplexity

    e = state.cfg.eval
    if not e.data:
        return None
    ppl, _ = perplexity(model, _eval_ids(state, tokenizer), e.seqlen, max_windows=e.max_windows,
                        batch_size=e.batch_size, device=state.cfg.device,
                        on_progress=lambda d, t: report_progress(f"iteration {iteration}: evaluate before finetune",
                                                                 d, t))
    return ppl


def _latest_train_state(state: RunState, iteration: int, key: str) -> tuple[TrainState, dict] | None:
    """The committed training state of this step's key with the most steps, and what was recorded beside it."""
    for uri in reversed(state.store.steps_of(iteration, TRAIN_STATE, key[:10])):
        if state.store.verify_step(uri):
            tensors = state.store.read_object(uri, "state.safetensors")
            meta = state.store.read_object(uri, "state.json")
            return TrainState.from_dicts(tensors, meta["train"]), meta["context"]
    return None


def _drop_train_states(state: RunState, iteration: int, key: str, keep: str | None = None) -> None:
    for uri in state.store.steps_of(iteration, TRAIN_STATE, key[:10]):
        if uri != keep:
            state.store.drop_step(uri)


def _cached_teacher(state: RunState, iteration: int, key: str, train_ids: torch.Tensor) -> TeacherTopK:
    """The teacher's top-k logits for this step's training windows: read from the store, or computed with the
    teacher, committed, and the teacher freed, so that it never sits in memory beside the training student."""
    ft = state.cfg.finetune
    uri = state.store.step_uri(iteration, TEACHER_LOGITS, key[:10])
    if state.store.steps_of(iteration, TEACHER_LOGITS, key[:10]) and state.store.verify_step(uri):
        tensors = state.store.read_object(uri, "teacher.safetensors")
        return TeacherTopK(tensors["values"], tensors["indices"])
    cached = teacher_topk_logits(state.teacher(), train_ids, ft.teacher_topk, batch_size=ft.batch_size)
    state.forget_teacher()
    # bf16 values, in memory as stored, so that a resumed run trains on the very numbers a fresh one does;
    # half of fp32's bytes at (n, L, k), and the loss is a softmax over k of them
    cached = TeacherTopK(cached.values.to(torch.bfloat16), cached.indices)
    state.store.commit_step(uri, {"teacher.safetensors": {"values": cached.values, "indices": cached.indices}},
                            {"windows": int(train_ids.shape[0]), "topk": ft.teacher_topk})
    return cached


def _finetune_material(p: dict) -> dict:
    state = p["state"]
    epochs = state.plan.step(p["iteration"]).epochs
    material = {"checkpoint": p["checkpoint"].digest, "tiers": p["tiers"].digest, "epochs": epochs}
    if state.cfg.prune.saliency == "fisher":  # the step then also stores the gradients' statistics
        material["saliency"] = "fisher"
    if state.cfg.finetune.obs_update:  # the OBS update's Gram matrices come from the calibration windows
        material.update(obs_update=True, calibration=state.identity["calibration"], model=state.identity["model"])
    if needs_training(state.cfg, epochs):
        # What training depends on: its settings, its corpus and the calibration draw left out of it, the teacher.
        identity = state.identity
        material.update(finetune=identity["finetune"], calibration=identity["calibration"],
                        model=identity["model"], eval=identity["eval"])
    return material


def _train(state: RunState, iteration: int, key: str, model: nn.Module, tokenizer, masks: PackedMasks,
           n_tokens: int, record: dict) -> tuple[set[str], dict[str, torch.Tensor]]:
    """Fine-tune the working model in place for n_tokens; returns the names of the tensors training changed, and
    the weights' mean squared gradients when the run ranks by them (--saliency fisher), else {}."""
    ft: FinetuneConfig = state.cfg.finetune
    device = state.cfg.device
    keep = {name: masks.mask(name, device) for name in masks}
    if state.finetune_corpus is None:  # tokenized once per process (seconds for a C4 shard)
        state.finetune_corpus = finetune_corpus(state.cfg, tokenizer)
    stream, corpus = state.finetune_corpus
    # Each iteration its own draw of windows (the seed moves with the iteration), from the same documents.
    train_ids = draw_windows(stream, ft.seqlen, n_tokens, seed=ft.seed * 1000 + iteration)
    if state.held_out_ids is None:  # tokenized once per process, like the evaluation text
        state.held_out_ids = (_held_out_ids(state.cfg, tokenizer),)
    val_ids = state.held_out_ids[0]
    resumed = _latest_train_state(state, iteration, key)
    if resumed is None:
        if ft.fade_fraction:  # measured demoted; training then starts from the weights as they were, and fades them
            with masks_applied(model, keep):
                before = {"ppl_before_finetune": _ppl_before(state, iteration, model, tokenizer)}
        else:
            _demoted_start(state, iteration, model, tokenizer, masks)
            before = {"ppl_before_finetune": _ppl_before(state, iteration, model, tokenizer)}
    else:
        before = resumed[1]
    teacher = None
    if ft.kd_weight > 0 or ft.hidden_weight > 0:
        teacher = _cached_teacher(state, iteration, key, train_ids) if ft.teacher_cache else state.teacher()
    total_steps = math.ceil(train_ids.shape[0] / (ft.batch_size * ft.grad_accum))

    def commit(train_state: TrainState) -> None:
        if train_state.step >= total_steps:
            return  # the checkpoint commit follows at once; a state of the finished run would only cost bytes
        tensors, meta = train_state.as_dicts()
        uri = state.store.step_uri(iteration, TRAIN_STATE, f"{key[:10]}{train_state.step:06d}")
        state.store.commit_step(uri, {"state.safetensors": tensors, "state.json": {"train": meta, "context": before}},
                                {"step": train_state.step, "of": total_steps})
        _drop_train_states(state, iteration, key, keep=uri)  # one state at a time: each is weights plus Adam's
        crash_point(f"step:iter-{iteration:03d}/finetune:state-{train_state.step}")  # tests only (tierprune.faults)

    result = finetune_model_(model, keep, train_ids, ft, teacher=teacher, val_ids=val_ids,
                             state=resumed[0] if resumed else None, on_step=commit,
                             on_progress=lambda done, total: report_progress(f"iteration {iteration}: finetune",
                                                                             done, total),
                             fisher=state.cfg.prune.saliency == "fisher")
    record.update(before, method=ft.method, tokens=result.tokens, steps=result.steps,
                  train_seconds=round(result.seconds, 3), stopped_early=result.stopped_early,
                  resumed_from_step=resumed[0].step if resumed else None,
                  first_loss=result.losses[0] if result.losses else None,
                  last_loss=result.losses[-1] if result.losses else None,
                  val_losses=[list(v) for v in result.val_losses], windows=int(train_ids.shape[0]), **corpus)
    if ft.fade_fraction:
        record["fade_fraction"] = ft.fade_fraction
    if ft.method == "lora" or ft.train == "linears":
        return {f"{name}.weight" for name in named_linears(model)} | _biases(model), result.fisher
    return {name for name, _ in model.named_parameters()}, result.fisher


def _biases(model: nn.Module) -> set[str]:
    return {f"{name}.bias" for name, m in named_linears(model).items() if getattr(m, "bias", None) is not None}


@task(name="finetune", persist_result=True, cache_policy=store_cache_policy("checkpoint", _finetune_material))
def finetune_task(state: RunState, iteration: int, checkpoint: ArtifactRef, tiers: ArtifactRef) -> ArtifactRef:
    """The next checkpoint: the model at `checkpoint` with the masks of `tiers` applied, then fine-tuned as the
    plan's epochs say; only the tensors that changed are written."""
    epochs = state.plan.step(iteration).epochs
    n_tokens = iteration_tokens(state.cfg.finetune, epochs)
    material = _finetune_material({"state": state, "iteration": iteration, "checkpoint": checkpoint, "tiers": tiers})
    key = step_key("checkpoint", material)
    record: dict = {"epochs": epochs, "tokens_planned": n_tokens if needs_training(state.cfg, epochs) else 0}

    def compute() -> tuple[dict, dict[str, int]]:
        loaded = state.model_at(checkpoint)
        masks = state.masks_of(tiers)
        if masks is None:
            raise TierpruneError(f"{tiers.uri} holds no keep masks to apply")
        fisher: dict[str, torch.Tensor] = {}
        try:
            if needs_training(state.cfg, epochs):
                changed, fisher = _train(state, iteration, key, loaded.model, loaded.tokenizer, masks, n_tokens,
                                         record)
            else:
                changed = _demoted_start(state, iteration, loaded.model, loaded.tokenizer, masks)
                record.update(method="none", tokens=0, steps=0)
            if state.cfg.finetune.obs_update:
                record["obs_update"] = True
            index, blobs = state.save_checkpoint(changed)
        except BaseException:
            state.forget_model_state()  # half-changed weights must never pass for a checkpoint
            raise
        # The next iteration's scores and masks read it beside the weights it was measured on.
        return {"checkpoint.json": index, **({FISHER_FILE: fisher} if fisher else {})}, blobs

    ref = committed_or_compute(state.store, iteration, "checkpoint", material, compute, record)
    _drop_train_states(state, iteration, key)
    for uri in state.store.steps_of(iteration, TEACHER_LOGITS, key[:10]):
        state.store.drop_step(uri)  # scratch of this step, like the training states: the checkpoint is in
    return ref
