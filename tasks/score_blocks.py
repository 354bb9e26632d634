"""Step 2 of a progressive iteration: the two block scores the two-phase demotion ranks on.

score      mean Wanda score |W|·sqrt(S) of the block (edge blocks over their real elements): phase 1.
score_2_4  mean Wanda score over the weights the block's 2:4 pattern keeps: phase 2's re-score. The
           pattern keeps the 2 highest of every 4 by `select` (the Wanda score, or |W|). For a block
           already 2:4, with exactly two non-zero weights per group, it is the mean over those.
Both are computed on the model as it is now, so earlier iterations' zeros count.
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
from tierprune.kernels.scores import block_mean, magnitude_scores, masked_block_mean, wanda_scores

from .prune import named_linears
from .refs import ArtifactRef, committed_or_compute, store_cache_policy
from .tier_tables import block_index_columns

if TYPE_CHECKING:
    from .run_state import RunState

__all__ = ["SCORE_COLUMNS", "score_blocks", "score_blocks_task"]

# module str, layer/block_row/block_col int32, score/score_2_4 float32; rows in tier_table's order
SCORE_COLUMNS = ["module", "layer", "block_row", "block_col", "score", "score_2_4"]


@torch.no_grad()
def score_blocks(model: nn.Module, stats: dict[str, torch.Tensor], *, block_size: int = 16,
                 select: Literal["wanda", "magnitude"] = "wanda", device: str | torch.device = "cpu") -> pd.DataFrame:
    """One row per block of every prunable linear; stats: module -> S (in,) from activation_stats."""
    if select not in ("wanda", "magnitude"):
        raise ValueError(f"select must be 'wanda' or 'magnitude', got {select!r}")
    names, dense, nm = [], [], []
    for name, module in named_linears(model).items():
        if name not in stats:
            raise TierpruneError(f"no activation statistics for {name}: were they collected on this model?")
        W = weight_view(module).to(device)  # (out, in)
        S = stats[name].to(device)  # (in,)
        if W.shape[1] != S.shape[0] or W.shape[1] % 4:
            raise TierpruneError(f"{name}: weight (out, in) {tuple(W.shape)} does not fit statistics of "
                                 f"{S.shape[0]} features, or its input dim is not divisible by 4 (2:4)")
        scores = wanda_scores(W, S)  # (out, in) fp32
        chooser = magnitude_scores(W) if select == "magnitude" else scores
        names.append(name)
        dense.append(block_mean(scores, block_size))  # (nbr, nbc)
        nm.append(masked_block_mean(scores, nm_mask(chooser, 2, 4), block_size))  # (nbr, nbc)
    return pd.DataFrame({
        **block_index_columns(names, [tuple(d.shape) for d in dense]),
        "score": torch.cat([d.flatten() for d in dense]).float().cpu().numpy(),
        "score_2_4": torch.cat([m.flatten() for m in nm]).float().cpu().numpy(),
    })


# ---------------------------------------------------------------------------- the Prefect step
def _scores_material(p: dict) -> dict:
    prune = p["state"].cfg.prune
    return {"checkpoint": p["checkpoint"].digest, "activations": p["activations"].digest,
            "block_size": prune.block_size, "select": prune.select}


@task(name="score-blocks", persist_result=True, cache_policy=store_cache_policy("scores", _scores_material))
def score_blocks_task(state: RunState, iteration: int, checkpoint: ArtifactRef, activations: ArtifactRef) -> ArtifactRef:
    """Block scores of the model at `checkpoint` under the collected statistics, committed."""
    from .collect_activations import activation_stats

    def compute() -> dict:
        loaded = state.model_at(checkpoint)
        stats = activation_stats(state.store.read_object(activations.uri, "activations.parquet"))
        prune = state.cfg.prune
        return {"scores.parquet": score_blocks(loaded.model, stats, block_size=prune.block_size, select=prune.select,
                                               device=state.cfg.device)}

    material = _scores_material({"state": state, "checkpoint": checkpoint, "activations": activations})
    return committed_or_compute(state.store, iteration, "scores", material, compute)
