"""Three tiers per block: Dense, 2:4 and TopK; the tier mask and the two-phase one-way demotion.

A tier map is an int8 tensor (nbr, nbc) per weight matrix: 0 Dense, 1 2:4, 2 TopK. Tiers only
move down (0 → 1 → 2). Demotion, as in the progressive method:
  phase 1: the Dense blocks with the lowest mean score become 2:4;
  phase 2: every 2:4 block is re-scored on the weights its 2:4 pattern keeps, and the lowest
           become TopK.
"""
from __future__ import annotations

import torch

from .masks import expand_blocks, nm_mask, topk_in_blocks_mask
from .scores import block_mean, masked_block_mean

__all__ = [
    "DENSE",
    "NM_2_4",
    "TOPK",
    "TIER_NAMES",
    "dense_tier_map",
    "tier_keep_mask",
    "tier_counts",
    "target_counts",
    "demotion_counts",
    "demote_tiers",
    "demote_tiers_global",
]

DENSE, NM_2_4, TOPK = 0, 1, 2
TIER_NAMES = ("dense", "2:4", "topk")


def dense_tier_map(shape: tuple[int, int], block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """All-Dense tier map for a weight of `shape`; -> (ceil(out/bs), ceil(in/bs)) int8."""
    rows, cols = shape
    return torch.zeros((-(-rows // block_size), -(-cols // block_size)), dtype=torch.int8, device=device)


def tier_keep_mask(select: torch.Tensor, tier_map: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """Keep-mask (out, in) realising a tier map; `select` (out, in) picks the survivors inside blocks."""
    shape = tuple(select.shape)
    tiers = expand_blocks(tier_map, shape, block_size)  # (out, in)
    keep = tiers == DENSE
    if (tier_map == NM_2_4).any():
        keep |= (tiers == NM_2_4) & nm_mask(select, 2, 4)
    if (tier_map == TOPK).any():
        keep |= topk_in_blocks_mask(select, topk, block_size, blocks=tier_map == TOPK)
    return keep


def tier_counts(tier_map: torch.Tensor) -> torch.Tensor:
    """Number of blocks in each tier; -> (3,) int64."""
    return torch.bincount(tier_map.flatten().long(), minlength=3)


def target_counts(n_blocks: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Block counts (dense, 2:4, topk) for tier fractions; 2:4 takes the rounding remainder."""
    n_dense = round(fractions[0] * n_blocks)
    n_topk = min(round(fractions[2] * n_blocks), n_blocks - n_dense)  # both may round up
    return n_dense, n_blocks - n_dense - n_topk, n_topk


def demotion_counts(current: torch.Tensor | tuple[int, int, int],
                    target: tuple[int, int, int]) -> tuple[int, int]:
    """How many blocks move Dense→2:4 and 2:4→TopK to reach `target` counts; refuses upward moves."""
    cur = [int(c) for c in current]
    to_2_4 = cur[0] - target[0]
    to_topk = target[2] - cur[2]
    if to_2_4 < 0 or to_topk < 0:
        raise ValueError(f"tiers only move down: current counts {cur} cannot reach {list(target)}")
    return to_2_4, to_topk


def _lowest(values: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` lowest `values` among `candidates` (same shape, flattened ranking)."""
    assert count <= int(candidates.sum()), (count, int(candidates.sum()))
    chosen = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count:
        v = values.flatten().masked_fill(~candidates.flatten(), float("inf"))
        # Stable so that equal scores demote the lower block index first, on every device.
        chosen[torch.sort(v, stable=True).indices[:count]] = True
    return chosen.view_as(values)


def demote_tiers(scores: torch.Tensor, tier_map: torch.Tensor, to_2_4: int, to_topk: int,
                 block_size: int, select: torch.Tensor | None = None) -> torch.Tensor:
    """Two-phase demotion of one matrix; scores (out, in), tier_map (nbr, nbc) -> new tier map.

    `select` (default: scores) chooses the 2:4 survivors that phase 2 re-scores on.
    """
    select = scores if select is None else select
    new = tier_map.clone()
    dense_means = block_mean(scores, block_size)  # (nbr, nbc)
    new[_lowest(dense_means, new == DENSE, to_2_4)] = NM_2_4
    if to_topk:
        kept = nm_mask(select, 2, 4)
        nm_means = masked_block_mean(scores, kept, block_size)
        new[_lowest(nm_means, new == NM_2_4, to_topk)] = TOPK
    return new


def _relative(block_scores: torch.Tensor) -> torch.Tensor:
    # Raw Wanda scores differ by orders of magnitude between matrices (activation scales), so a
    # model-wide ranking compares each block with its own matrix's mean block score.
    return block_scores / block_scores.mean().clamp_min(torch.finfo(torch.float32).tiny)


def demote_tiers_global(scores: list[torch.Tensor], tier_maps: list[torch.Tensor], to_2_4: int,
                        to_topk: int, block_size: int, selects: list[torch.Tensor] | None = None,
                        relative: bool = True) -> list[torch.Tensor]:
    """Two-phase demotion with one budget across many matrices (blocks ranked model-wide).

    With `relative` (default) block scores are divided by their matrix's mean block score first.
    """
    selects = scores if selects is None else selects
    norm = _relative if relative else (lambda b: b)
    sizes = [t.numel() for t in tier_maps]
    flat = torch.cat([t.flatten() for t in tier_maps])
    dense_means = torch.cat([norm(block_mean(s, block_size)).flatten().to(flat.device) for s in scores])
    flat[_lowest(dense_means, flat == DENSE, to_2_4)] = NM_2_4
    if to_topk:
        nm_means = torch.cat([
            norm(masked_block_mean(s, nm_mask(sel, 2, 4), block_size)).flatten().to(flat.device)
            for s, sel in zip(scores, selects)
        ])
        flat[_lowest(nm_means, flat == NM_2_4, to_topk)] = TOPK
    return [part.view_as(t) for part, t in zip(flat.split(sizes), tier_maps)]
