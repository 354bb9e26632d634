"""Step 3 of a progressive iteration: move blocks down a tier to reach the iteration's fractions,
and decide, once, which weights each block keeps.

Tables in, table out: the current tier table (tier_tables.TIER_COLUMNS) and this iteration's block
scores (score_blocks.SCORE_COLUMNS) give the next tier table. Tiers only move down, so a schedule
must never ask for more Dense or 2:4 blocks than there are, nor fewer TopK ones.

The keep mask of every linear is then stored data (masks.safetensors: bits, shapes in the metadata):
inside 2:4 and TopK blocks the survivors are the highest Wanda scores (or |W|), and a weight removed
in an earlier iteration stays removed (the new mask is ANDed with the previous one). Fine-tuning,
evaluation, export and resume apply this mask; nothing re-derives it from which weights are zero.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import pandas as pd
import torch
from torch import nn

from prefect import task

from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError
from tierprune.kernels.scores import magnitude_scores
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
    tier_keep_mask,
)
from tierprune.storage.formats import (
    pack_mask,
    tensor_file_bytes,
    tensor_file_metadata,
    tensors_from_bytes,
    unpack_mask,
)

from .prune import named_linears
from .refs import ArtifactRef, committed_or_compute, store_cache_policy
from .score_blocks import ranks_by_fisher, read_fisher, weight_scores
from .tier_tables import block_maps, iteration_demoted_from_table, tier_maps_from_table, tier_table

if TYPE_CHECKING:
    from .run_state import RunState

__all__ = ["initial_tiers", "demote", "PackedMasks", "keep_masks", "masks_file", "read_masks", "demote_task"]


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
    ranked = torch.full(old.shape, float("nan"), device=old.device)
    if to_2_4:
        ranked = torch.where(old == DENSE, dense_means.float(), ranked)
    if to_topk:
        ranked = torch.where(after_phase1 == NM_2_4, nm_means.float(), ranked)
    return ranked


def demote(tiers: pd.DataFrame, scores: pd.DataFrame, fractions: tuple[float, float, float], iteration: int, *,
           scope: Literal["matrix", "global"] = "matrix", device: str | torch.device = "cpu",
           relative: bool = True) -> pd.DataFrame:
    """The next tier table: fractions (dense, 2:4, topk) of blocks per matrix, or over the whole model.

    Blocks that change tier get iteration_demoted = iteration; the score column holds the score each
    block was ranked on this iteration (phase 1: score, phase 2: score_2_4; in global scope divided by
    the matrix's mean block score when `relative`, as ranked), NaN for blocks no phase ranked.
    relative=False ranks global scope on the raw scores: right for scores in one unit across matrices
    (Fisher's, in loss), wrong for Wanda's, whose scale follows each layer's activations.
    """
    _check_fractions(fractions)
    if scope not in ("matrix", "global"):
        raise ValueError(f"scope must be 'matrix' or 'global', got {scope!r}")
    # The rankings are sorts over every block (25 million at 7B): on the GPU when there is one.
    old = {n: t.to(device) for n, t in tier_maps_from_table(tiers).items()}
    demoted_at = {n: t.to(device) for n, t in iteration_demoted_from_table(tiers).items()}
    dense_means = {n: t.to(device) for n, t in block_maps(scores, "score", torch.float32).items()}
    nm_means = {n: t.to(device) for n, t in block_maps(scores, "score_2_4", torch.float32).items()}
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
        mids = demote_by_block_scores_global(maps, d, None, to_2_4, 0, relative=relative)
        finals = demote_by_block_scores_global(mids, d, m, 0, to_topk, relative=relative)
        as_ranked = relative_block_scores if relative else (lambda b: b)
        for name, t, mid, final, dn, nn_ in zip(names, maps, mids, finals, d, m):
            new[name] = final
            ranked[name] = _ranked_on(t, mid, as_ranked(dn), as_ranked(nn_), to_2_4, to_topk)

    for name in names:
        assert (new[name] >= old[name]).all(), f"{name}: a block moved up a tier"
        changed = new[name] != old[name]
        demoted_at[name] = torch.where(changed, torch.tensor(iteration, dtype=torch.int16, device=changed.device),
                                       demoted_at[name])
    cpu = (lambda maps: {n: t.cpu() for n, t in maps.items()})
    return tier_table(cpu(new), cpu(demoted_at), cpu(ranked))


class PackedMasks:
    """module -> keep mask (out, in), held as bits (an eighth of a byte per weight) and unpacked on use."""

    def __init__(self, bits: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]):
        if set(bits) != set(shapes):
            raise ValueError("every packed mask needs its shape")
        self.bits, self.shapes = bits, shapes

    def __contains__(self, name: str) -> bool:
        return name in self.bits

    def __iter__(self):
        return iter(self.bits)

    def __len__(self) -> int:
        return len(self.bits)

    def mask(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The bool keep mask (out, in) of one module, on device."""
        return unpack_mask(self.bits[name].to(device), self.shapes[name])

    def check_covers(self, names) -> None:
        """Refuse (one line) masks whose modules are not exactly `names` (a model's prunable linears)."""
        names = set(names)
        if set(self.bits) != names:
            missing, extra = sorted(names - set(self.bits)), sorted(set(self.bits) - names)
            raise TierpruneError(f"masks do not match the model: modules without a mask {missing[:3]}, "
                                 f"unknown modules {extra[:3]}")

    def mask_for(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """The keep mask of module `name` on W's device, refused (one line) unless it has W's (out, in) shape."""
        mask = self.mask(name, W.device)
        if mask.shape != W.shape:
            raise TierpruneError(f"the mask of {name} is {tuple(mask.shape)}, its weight (out, in) {tuple(W.shape)}")
        return mask


@torch.no_grad()
def keep_masks(model: nn.Module, tiers: pd.DataFrame, stats: dict[str, torch.Tensor] | None,
               previous: PackedMasks | None, *, block_size: int = 16, topk: int = 10,
               select: Literal["wanda", "magnitude"] = "wanda",
               fisher: dict[str, torch.Tensor] | None = None) -> PackedMasks:
    """The keep mask of every linear for a tier table: Dense blocks keep all, 2:4 two of every four along the
    input dimension, TopK the `topk` best of the block, by Wanda score |W|·sqrt(S) (stats: module -> S (in,)),
    by |W|·sqrt(F) where `fisher` (module -> F (out, in)) is given and select is 'wanda', or by |W|; ANDed with
    the previous iteration's mask so that a removed weight never returns."""
    if select not in ("wanda", "magnitude"):
        raise ValueError(f"select must be 'wanda' or 'magnitude', got {select!r}")
    maps = tier_maps_from_table(tiers)
    linears = named_linears(model)
    if set(maps) != set(linears):
        missing, extra = sorted(set(linears) - set(maps)), sorted(set(maps) - set(linears))
        raise TierpruneError(f"tier map does not match the model: modules without a tier map {missing[:3]}, "
                             f"unknown modules {extra[:3]}")
    bits, shapes = {}, {}
    for name, module in linears.items():
        W = weight_view(module)  # (out, in)
        tier_map = maps[name]
        if tier_map.shape != dense_tier_map(tuple(W.shape), block_size).shape:
            raise TierpruneError(f"tier map does not match the model: {name} has weight (out, in) "
                                 f"{tuple(W.shape)}, tier map {tuple(tier_map.shape)} of blocks of {block_size}")
        chooser = magnitude_scores(W) if select == "magnitude" else weight_scores(name, W, stats or {}, fisher)
        keep = tier_keep_mask(chooser, tier_map.to(W.device), block_size, topk)  # (out, in) bool
        if previous is not None:
            keep &= previous.mask(name, W.device)
        bits[name] = pack_mask(keep).cpu()
        shapes[name] = tuple(W.shape)
    return PackedMasks(bits, shapes)


def masks_file(masks: PackedMasks) -> bytes:
    """masks.safetensors: one uint8 bit tensor per module, the (out, in) shapes in the metadata."""
    import json

    # One metadata key: safetensors writes several in no fixed order, and these bytes must be reproducible.
    header = {"format": "tierprune-masks/1 (bits little-endian within a byte)",
              "shapes": {n: list(s) for n, s in masks.shapes.items()}}
    return tensor_file_bytes(masks.bits, {"tierprune": json.dumps(header)})


def read_masks(data: bytes) -> PackedMasks:
    """The PackedMasks that masks_file stored."""
    import json

    header = json.loads(tensor_file_metadata(data)["tierprune"])
    shapes = {n: tuple(s) for n, s in header["shapes"].items()}
    bits = tensors_from_bytes(data)
    return PackedMasks({n: bits[n] for n in shapes}, shapes)  # the model's module order, as written


# ---------------------------------------------------------------------------- the Prefect step
def _demote_material(p: dict) -> dict:
    state = p["state"]
    prune = state.cfg.prune
    return {"tiers": p["tiers"].digest, "scores": p["scores"].digest, "checkpoint": p["checkpoint"].digest,
            "activations": p["activations"].digest, "fractions": list(state.plan.step(p["iteration"]).fractions),
            "scope": prune.scope, "block_size": prune.block_size, "topk": prune.topk, "select": prune.select,
            # runs made before --saliency keep their keys
            **({"saliency": prune.saliency} if prune.saliency != "wanda" else {})}


@task(name="demote", persist_result=True, cache_policy=store_cache_policy("tiers", _demote_material))
def demote_task(state: RunState, iteration: int, checkpoint: ArtifactRef, tiers: ArtifactRef, scores: ArtifactRef,
                activations: ArtifactRef) -> ArtifactRef:
    """The next tier table and keep masks (committed together as the `tiers` step)."""
    from .collect_activations import activation_stats

    store, prune = state.store, state.cfg.prune

    def compute() -> dict:
        # Fisher scores are in one unit (loss) across matrices: a global ranking compares them as they are.
        table = demote(store.read_object(tiers.uri, "tiers.parquet"), store.read_object(scores.uri, "scores.parquet"),
                       state.plan.step(iteration).fractions, iteration, scope=prune.scope, device=state.cfg.device,
                       relative=not ranks_by_fisher(state, checkpoint))
        loaded = state.model_at(checkpoint)
        stats = activation_stats(store.read_object(activations.uri, "activations.parquet"))
        masks = keep_masks(loaded.model, table, stats, state.masks_of(tiers), block_size=prune.block_size,
                           topk=prune.topk, select=prune.select, fisher=read_fisher(state, checkpoint))
        computed["masks"] = masks
        return {"tiers.parquet": table, "masks.safetensors": masks_file(masks)}

    computed: dict = {}
    material = _demote_material({"state": state, "iteration": iteration, "tiers": tiers, "scores": scores,
                                 "checkpoint": checkpoint, "activations": activations})
    ref = committed_or_compute(store, iteration, "tiers", material, compute)
    if "masks" in computed:
        state.remember_masks(ref.digest, computed["masks"])  # the next steps need them: no re-read
    return ref
