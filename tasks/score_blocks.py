"""Step 2 of a progressive iteration: the two block scores the two-phase demotion ranks on.

score      mean Wanda score |W|·sqrt(S) of the block (edge blocks over their real elements): phase 1.
score_2_4  mean Wanda score over the weights the block's 2:4 pattern keeps: phase 2's re-score. The
           pattern keeps the 2 highest of every 4 by `select` (the Wanda score, or |W|). For a block
           already 2:4, with exactly two non-zero weights per group, it is the mean over those.
Both are computed on the model as it is now, so earlier iterations' zeros count.

With `--saliency fisher` the per-weight score is |W|·sqrt(F) instead, F the mean squared gradient that the
previous iteration's fine-tuning left in AdamW's second moment (kernels.scores.fisher_scores); the checkpoint
step stores it as fisher.safetensors. A checkpoint without one (the dense model, an iteration that did not
train) is scored by Wanda, and the step's record says which score it used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import pandas as pd
import torch
from prefect import task
from torch import nn

from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError
from tierprune.kernels.masks import nm_mask
from tierprune.kernels.scores import block_mean, fisher_scores, magnitude_scores, masked_block_mean, wanda_scores

from .prune import named_linears
from .refs import ArtifactRef, committed_or_compute, store_cache_policy
from .tier_tables import block_index_columns

if TYPE_CHECKING:
    from .run_state import RunState

__all__ = ["SCORE_COLUMNS", "FISHER_FILE", "score_blocks", "weight_scores", "ranks_by_fisher", "read_fisher",
           "score_blocks_task"]

FISHER_FILE = "fisher.safetensors"  # in a checkpoint step: module -> F (out, in), written by finetune

# module str, layer/block_row/block_col int32, score/score_2_4 float32; rows in tier_table's order
SCORE_COLUMNS = ["module", "layer", "block_row", "block_col", "score", "score_2_4"]


def weight_scores(name: str, W: torch.Tensor, stats: dict[str, torch.Tensor],
                  fisher: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The per-weight score of module `name` (out, in) fp32: |W|·sqrt(F) when `fisher` is given, else Wanda's."""
    if fisher is not None:
        if name not in fisher or fisher[name].shape != W.shape:
            got = tuple(fisher[name].shape) if name in fisher else "none"
            raise TierpruneError(f"the Fisher statistics of {name} ({got}) do not fit its weight (out, in) "
                                 f"{tuple(W.shape)}: were they saved from this model?")
        return fisher_scores(W, fisher[name].to(W.device))
    if name not in stats:
        raise TierpruneError(f"no activation statistics for {name}: were they collected on this model?")
    S = stats[name].to(W.device)  # (in,)
    if W.shape[1] != S.shape[0]:
        raise TierpruneError(f"{name}: weight (out, in) {tuple(W.shape)} does not fit statistics of "
                             f"{S.shape[0]} features")
    return wanda_scores(W, S)


@torch.no_grad()
def score_blocks(model: nn.Module, stats: dict[str, torch.Tensor], *, block_size: int = 16,
                 select: Literal["wanda", "magnitude"] = "wanda", device: str | torch.device = "cpu",
                 fisher: dict[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """One row per block of every prunable linear; stats: module -> S (in,) from activation_stats;
    fisher (optional): module -> F (out, in), which then replaces Wanda's score (see weight_scores)."""
    if select not in ("wanda", "magnitude"):
        raise ValueError(f"select must be 'wanda' or 'magnitude', got {select!r}")
    names, dense, nm = [], [], []
    for name, module in named_linears(model).items():
        W = weight_view(module).to(device)  # (out, in)
        if W.shape[1] % 4:
            raise TierpruneError(f"{name}: weight (out, in) {tuple(W.shape)}: its input dim is not divisible by 4 "
                                 "(2:4)")
        scores = weight_scores(name, W, stats, fisher)  # (out, in) fp32
        chooser = magnitude_scores(W) if select == "magnitude" else scores
        names.append(name)
        dense.append(block_mean(scores, block_size))  # (nbr, nbc)
        nm.append(masked_block_mean(scores, nm_mask(chooser, 2, 4), block_size))  # (nbr, nbc)
    return pd.DataFrame({
        **block_index_columns(names, [tuple(d.shape) for d in dense]),
        "score": torch.cat([d.flatten() for d in dense]).float().cpu().numpy(),
        "score_2_4": torch.cat([m.flatten() for m in nm]).float().cpu().numpy(),
    })


def ranks_by_fisher(state: RunState, checkpoint: ArtifactRef) -> bool:
    """Whether the blocks of the model at `checkpoint` are ranked by Fisher: asked for, and stored with it."""
    return state.cfg.prune.saliency == "fisher" and FISHER_FILE in checkpoint.files


def read_fisher(state: RunState, checkpoint: ArtifactRef) -> dict[str, torch.Tensor] | None:
    """The Fisher statistics stored with `checkpoint` when the run ranks by them (--saliency fisher), else None.

    Read once per checkpoint: the scores and the demote step of an iteration both rank by them."""
    if not ranks_by_fisher(state, checkpoint):
        return None
    return state.fisher_of(checkpoint)


# ---------------------------------------------------------------------------- the Prefect step
def _scores_material(p: dict) -> dict:
    prune = p["state"].cfg.prune
    material = {"checkpoint": p["checkpoint"].digest, "activations": p["activations"].digest,
                "block_size": prune.block_size, "select": prune.select}
    if prune.saliency != "wanda":  # runs made before --saliency keep their keys
        material["saliency"] = prune.saliency
    return material


@task(name="score-blocks", persist_result=True, cache_policy=store_cache_policy("scores", _scores_material))
def score_blocks_task(state: RunState, iteration: int, checkpoint: ArtifactRef, activations: ArtifactRef) -> ArtifactRef:
    """Block scores of the model at `checkpoint` under the collected statistics, committed."""
    from .collect_activations import activation_stats

    def compute() -> dict:
        loaded = state.model_at(checkpoint)
        stats = activation_stats(state.store.read_object(activations.uri, "activations.parquet"))
        prune = state.cfg.prune
        return {"scores.parquet": score_blocks(loaded.model, stats, block_size=prune.block_size, select=prune.select,
                                               device=state.cfg.device, fisher=read_fisher(state, checkpoint))}

    material = _scores_material({"state": state, "checkpoint": checkpoint, "activations": activations})
    used = "fisher" if ranks_by_fisher(state, checkpoint) else "wanda"
    return committed_or_compute(state.store, iteration, "scores", material, compute, {"saliency": used})
