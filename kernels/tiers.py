"""Three tiers per block: Dense, 2:4 and TopK; the tier mask and the two-phase one-way demotion.

A tier map is an int8 tensor (nbr, nbc) per weight matrix: 0 Dense, 1 2:4, 2 TopK. Tiers only
move down (0 → 1 → 2). Demotion, as in the progressive method:
  phase 1: the Dense blocks with the lowest mean score become 2:4;
  phase 2: every 2:4 block is re-scored on the weights its 2:4 pattern keeps, and the lowest
           become TopK.
"""
from __future__ import annotations

import torch

from .masks import expand_blocks, nm_mask, to_blocks, topk_in_blocks_mask
from .scores import block_mean, masked_block_mean

__all__ = [
    "DENSE",
    "NM_2_4",
    "TOPK",
    "TIER_NAMES",
    "dense_tier_map",
    "tier_keep_mask",
    "tier_violations",
    "fitting_tier_map",
    "tier_counts",
    "target_counts",
    "demotion_counts",
    "demote_by_block_scores",
    "demote_tiers",
    "relative_block_scores",
    "demote_by_block_scores_global",
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


def tier_violations(W: torch.Tensor, tier_map: torch.Tensor, block_size: int, topk: int) -> tuple[int, int]:
    """(groups of 4 in 2:4 blocks with more than 2 non-zeros, TopK blocks with more than topk non-zeros) of W (out, in)."""
    out, inp = W.shape
    nz = W != 0
    tiers = expand_blocks(tier_map, (out, inp), block_size)  # (out, in)
    bad_groups = 0
    if inp % 4 == 0:
        per_group = (nz & (tiers == NM_2_4)).view(out, inp // 4, 4).sum(dim=-1)  # (out, in/4)
        bad_groups = int((per_group > 2).sum())
    nbr, nbc = tier_map.shape
    padded = torch.zeros(nbr * block_size, nbc * block_size, dtype=torch.int32, device=W.device)
    padded[:out, :inp] = nz.int()
    per_block = padded.view(nbr, block_size, nbc, block_size).sum(dim=(1, 3))  # (nbr, nbc)
    bad_blocks = int(((tier_map.to(W.device) == TOPK) & (per_block > topk)).sum())
    return bad_groups, bad_blocks


def fitting_tier_map(W: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """The cheapest tier that holds each block of W (out, in) exactly, for a model pruned without a tier map.

    TopK where a block has at most `topk` non-zeros, else 2:4 where every group of 4 along the input holds
    at most 2, else Dense; -> (nbr, nbc) int8. Edge blocks count their padding as zeros, as packing does.
    """
    nz = to_blocks((W != 0).to(torch.int8), block_size)  # (nblocks, bs²)
    per_block = nz.sum(-1, dtype=torch.int32)
    fits_2_4 = (nz.view(len(nz), -1, 4).sum(-1) <= 2).all(-1)
    tiers = torch.where(per_block <= topk, TOPK, torch.where(fits_2_4, NM_2_4, DENSE)).to(torch.int8)
    return tiers.view(-(-W.shape[0] // block_size), -(-W.shape[1] // block_size))


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


def demote_by_block_scores(tier_map: torch.Tensor, dense_means: torch.Tensor, nm_means: torch.Tensor | None,
                           to_2_4: int, to_topk: int) -> torch.Tensor:
    """Two-phase demotion of one matrix from precomputed block scores; all (nbr, nbc) -> new tier map.

    Phase 1 ranks the Dense blocks on `dense_means`, phase 2 the 2:4 blocks (those just demoted
    included) on `nm_means`, which may be None when to_topk is 0. The input map is not modified.
    """
    assert dense_means.shape == tier_map.shape, (dense_means.shape, tier_map.shape)
    new = tier_map.clone()
    new[_lowest(dense_means.to(new.device), new == DENSE, to_2_4)] = NM_2_4
    if to_topk:
        assert nm_means is not None and nm_means.shape == tier_map.shape, "phase 2 needs nm_means"
        new[_lowest(nm_means.to(new.device), new == NM_2_4, to_topk)] = TOPK
    return new


def demote_tiers(scores: torch.Tensor, tier_map: torch.Tensor, to_2_4: int, to_topk: int,
                 block_size: int, select: torch.Tensor | None = None) -> torch.Tensor:
    """Two-phase demotion of one matrix; scores (out, in), tier_map (nbr, nbc) -> new tier map.

    `select` (default: scores) chooses the 2:4 survivors that phase 2 re-scores on.
    """
    select = scores if select is None else select
    dense_means = block_mean(scores, block_size)  # (nbr, nbc)
    nm_means = masked_block_mean(scores, nm_mask(select, 2, 4), block_size) if to_topk else None
    return demote_by_block_scores(tier_map, dense_means, nm_means, to_2_4, to_topk)


def _relative(block_scores: torch.Tensor) -> torch.Tensor:
    # Raw Wanda scores differ by orders of magnitude between matrices (activation scales), so a
    # model-wide ranking compares each block with its own matrix's mean block score.
    return block_scores / block_scores.mean().clamp_min(torch.finfo(torch.float32).tiny)


def relative_block_scores(block_scores: torch.Tensor) -> torch.Tensor:
    """Block scores (nbr, nbc) divided by their matrix's mean block score, as the global ranking sees them."""
    return _relative(block_scores)


def demote_by_block_scores_global(tier_maps: list[torch.Tensor], dense_means_list: list[torch.Tensor],
                                  nm_means_list: list[torch.Tensor] | None, to_2_4: int, to_topk: int,
                                  relative: bool = True) -> list[torch.Tensor]:
    """Two-phase demotion with one budget across many matrices, from precomputed block scores.

    Each list holds one (nbr, nbc) tensor per matrix; `nm_means_list` may be None when to_topk is 0.
    With `relative` (default) each matrix's block scores are divided by their mean first.
    """
    norm = _relative if relative else (lambda b: b)
    sizes = [t.numel() for t in tier_maps]
    flat = torch.cat([t.flatten() for t in tier_maps])
    dense_means = torch.cat([norm(d).flatten().to(flat.device) for d in dense_means_list])
    flat[_lowest(dense_means, flat == DENSE, to_2_4)] = NM_2_4
    if to_topk:
        assert nm_means_list is not None, "phase 2 needs nm_means_list"
        nm_means = torch.cat([norm(n).flatten().to(flat.device) for n in nm_means_list])
        flat[_lowest(nm_means, flat == NM_2_4, to_topk)] = TOPK
    return [part.view_as(t) for part, t in zip(flat.split(sizes), tier_maps)]


def demote_tiers_global(scores: list[torch.Tensor], tier_maps: list[torch.Tensor], to_2_4: int,
                        to_topk: int, block_size: int, selects: list[torch.Tensor] | None = None,
                        relative: bool = True) -> list[torch.Tensor]:
    """Two-phase demotion with one budget across many matrices (blocks ranked model-wide).

    With `relative` (default) block scores are divided by their matrix's mean block score first.
    """
    selects = scores if selects is None else selects
    dense_means = [block_mean(s, block_size) for s in scores]
    nm_means = None
    if to_topk:
        nm_means = [masked_block_mean(s, nm_mask(sel, 2, 4), block_size) for s, sel in zip(scores, selects)]
    return demote_by_block_scores_global(tier_maps, dense_means, nm_means, to_2_4, to_topk, relative=relative)
