"""Step 3 of a progressive iteration: move blocks down a tier to reach the iteration's fractions.

Tables in, table out: the current tier table (tier_tables.TIER_COLUMNS) and this iteration's block
scores (score_blocks.SCORE_COLUMNS) give the next tier table. Tiers only move down, so a schedule
must never ask for more Dense or 2:4 blocks than there are, nor fewer TopK ones.
"""
from __future__ import annotations

from typing import Literal

import pandas as pd
import torch
from torch import nn

from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError
from tierprune.kernels.tiers import (
    DENSE,
    NM_2_4,
    demote_by_block_scores,
    demote_by_block_scores_global,
    demotion_counts,
    dense_tier_map,
    relative_block_scores,
    target_counts,
    tier_counts,
)

from .prune import named_linears
from .tier_tables import block_maps, iteration_demoted_from_table, tier_maps_from_table, tier_table

__all__ = ["initial_tiers", "demote"]


def initial_tiers(model: nn.Module, block_size: int = 16) -> pd.DataFrame:
    """Every block of every prunable linear Dense, never demoted, unscored (tier_table schema)."""
    maps = {name: dense_tier_map(tuple(weight_view(m).shape), block_size) for name, m in named_linears(model).items()}
    return tier_table(maps)


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(not 0.0 <= f <= 1.0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"tier fractions must be three numbers in [0, 1] summing to 1, got {tuple(fractions)}")


def _counts(current: torch.Tensor, target: tuple[int, int, int], where: str, iteration: int) -> tuple[int, int]:
    try:
        return demotion_counts(current, target)
    except ValueError as e:
        raise TierpruneError(f"iteration {iteration}, {where}: {e} (the schedule moves blocks up a tier)") from e


def _ranked_on(old: torch.Tensor, after_phase1: torch.Tensor, dense_means: torch.Tensor,
               nm_means: torch.Tensor | None, to_2_4: int, to_topk: int) -> torch.Tensor:
    """(nbr, nbc) fp32: the score each block was ranked on this iteration (the later phase wins), else NaN."""
    ranked = torch.full(old.shape, float("nan"))
    if to_2_4:
        ranked = torch.where(old == DENSE, dense_means.float(), ranked)
    if to_topk:
        ranked = torch.where(after_phase1 == NM_2_4, nm_means.float(), ranked)
    return ranked


def demote(tiers: pd.DataFrame, scores: pd.DataFrame, fractions: tuple[float, float, float], iteration: int, *,
           scope: Literal["matrix", "global"] = "matrix") -> pd.DataFrame:
    """The next tier table: fractions (dense, 2:4, topk) of blocks per matrix, or over the whole model.

    Blocks that change tier get iteration_demoted = iteration; the score column holds the score each
    block was ranked on this iteration (phase 1: score, phase 2: score_2_4; in global scope divided by
    the matrix's mean block score, as ranked), NaN for blocks no phase ranked.
    """
    _check_fractions(fractions)
    if scope not in ("matrix", "global"):
        raise ValueError(f"scope must be 'matrix' or 'global', got {scope!r}")
    old = tier_maps_from_table(tiers)
    demoted_at = iteration_demoted_from_table(tiers)
    dense_means = block_maps(scores, "score", torch.float32)
    nm_means = block_maps(scores, "score_2_4", torch.float32)
    for name, t in old.items():
        if name not in dense_means or dense_means[name].shape != t.shape:
            got = tuple(dense_means[name].shape) if name in dense_means else "none"
            raise TierpruneError(f"block scores of {name} ({got}) do not match its tier map {tuple(t.shape)}")
    names = list(old)

    new: dict[str, torch.Tensor] = {}
    ranked: dict[str, torch.Tensor] = {}
    if scope == "matrix":
        for name in names:
            t = old[name]
            to_2_4, to_topk = _counts(tier_counts(t), target_counts(t.numel(), fractions), name, iteration)
            # Phase 1 alone first: the record of what was ranked needs the map between the phases.
            mid = demote_by_block_scores(t, dense_means[name], None, to_2_4, 0)
            new[name] = demote_by_block_scores(mid, dense_means[name], nm_means[name], 0, to_topk)
            ranked[name] = _ranked_on(t, mid, dense_means[name], nm_means[name], to_2_4, to_topk)
    else:
        maps = [old[n] for n in names]
        total = sum(t.numel() for t in maps)
        current = sum(tier_counts(t) for t in maps)
        to_2_4, to_topk = _counts(current, target_counts(total, fractions), "whole model (scope global)", iteration)
        d = [dense_means[n] for n in names]
        m = [nm_means[n] for n in names]
        mids = demote_by_block_scores_global(maps, d, None, to_2_4, 0, relative=True)
        finals = demote_by_block_scores_global(mids, d, m, 0, to_topk, relative=True)
        for name, t, mid, final, dn, nn_ in zip(names, maps, mids, finals, d, m):
            new[name] = final
            ranked[name] = _ranked_on(t, mid, relative_block_scores(dn), relative_block_scores(nn_), to_2_4, to_topk)

    for name in names:
        assert (new[name] >= old[name]).all(), f"{name}: a block moved up a tier"
        changed = new[name] != old[name]
        demoted_at[name] = torch.where(changed, torch.tensor(iteration, dtype=torch.int16), demoted_at[name])
    return tier_table(new, demoted_at, ranked)
