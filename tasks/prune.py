"""One-shot pruning of a causal LM: magnitude, Wanda or SparseGPT; unstructured, N:M, block or tiers.

Wanda and SparseGPT follow the reference order (tasks.layerwise): statistics of layer i come from
the outputs of the already-pruned layers < i. Tiers with a global budget need every layer's scores
before any block is ranked, so they calibrate the unpruned model in one walk and then demote.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tierprune.adapters import decoder_layers, layers_prefix, prunable_linears, weight_view
from tierprune.config import PruneConfig
from tierprune.errors import TierpruneError
from tierprune.kernels.masks import block_mask, matrix_mask, nm_mask, unstructured_mask
from tierprune.kernels.scores import magnitude_scores, wanda_scores
from tierprune.kernels.tiers import (
    demote_tiers,
    demote_tiers_global,
    dense_tier_map,
    fitting_tier_map,
    target_counts,
    tier_keep_mask,
)

from .layerwise import InputStats, walk_layers

__all__ = ["PruneResult", "named_linears", "check_shapes", "prune_model_", "prune_matrix_"]


@dataclass
class PruneResult:
    tier_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> (nbr, nbc) int8


def named_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable linear of the model by full module name, layer order."""
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    return {f"{prefix}.{i}.{n}": m for i, layer in enumerate(layers) for n, m in prunable_linears(layer).items()}


def tier_maps_from_zeros(model: nn.Module, block_size: int, topk: int) -> dict[str, torch.Tensor]:
    """Each linear's blocks in the cheapest tier that holds their zeros, for a model pruned without tier maps
    (N:M, block, unstructured, or elsewhere): what `convert` packs it as, and what the reports call its tiers."""
    return {name: fitting_tier_map(weight_view(m), block_size, topk) for name, m in named_linears(model).items()}


def check_shapes(model: nn.Module, cfg: PruneConfig) -> None:
    """Refuse a pattern the model's shapes cannot take, before anything is pruned."""
    group = cfg.nm[1] if cfg.nm else (4 if cfg.pattern == "tiers" else None)
    if group is None:
        return
    for name, module in named_linears(model).items():
        d_in = weight_view(module).shape[1]
        if d_in % group:
            what = cfg.pattern if cfg.nm else "tiers (2:4 inside blocks)"
            raise TierpruneError(f"pattern {what} needs input dims divisible by {group}; {name} has {d_in}")


def _scores(W: torch.Tensor, stats: InputStats | None, method: str) -> torch.Tensor:
    # SparseGPT's own saliency chooses unstructured and N:M masks inside its sweep; the block and tiers
    # patterns are chosen by Wanda's scores, and SparseGPT's OBS update then sets the weights kept.
    return wanda_scores(W, stats.sq_norm.to(W.device)) if method in ("wanda", "sparsegpt") else magnitude_scores(W)


def _select(W: torch.Tensor, scores: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    # The seed chose in-block survivors by |W|; Wanda scores are the default here.
    return magnitude_scores(W) if cfg.select == "magnitude" else scores


def prune_matrix_(W: torch.Tensor, stats: InputStats | None, cfg: PruneConfig) -> torch.Tensor | None:
    """Prune one (out, in) weight view in place; returns its tier map for the tiers pattern."""
    if cfg.method == "sparsegpt" and cfg.pattern not in ("block", "tiers"):
        from tierprune.kernels.sparsegpt import sparsegpt_prune

        n, m = cfg.nm or (0, 0)
        W_new, _ = sparsegpt_prune(W, stats.hessian, cfg.sparsity, n=n, m=m)
        W.copy_(W_new)
        return None
    scores = _scores(W, stats, cfg.method)
    tier_map = None
    if cfg.pattern == "tiers":
        tier_map = dense_tier_map(tuple(W.shape), cfg.block_size, W.device)
        n_dense, _, n_topk = target_counts(tier_map.numel(), cfg.tiers)
        tier_map = demote_tiers(scores, tier_map, tier_map.numel() - n_dense, n_topk, cfg.block_size,
                                select=_select(W, scores, cfg))
        keep = tier_keep_mask(_select(W, scores, cfg), tier_map, cfg.block_size, cfg.topk)
    elif cfg.nm:
        keep = nm_mask(scores, *cfg.nm)
    elif cfg.pattern == "block":
        keep = block_mask(scores, cfg.sparsity, cfg.block_size)
    elif cfg.method == "magnitude":
        keep = matrix_mask(scores, cfg.sparsity)  # the reference: one threshold per whole matrix
    else:
        keep = unstructured_mask(scores, cfg.sparsity)
    if cfg.method == "sparsegpt":
        from tierprune.kernels.sparsegpt import sparsegpt_prune

        W.copy_(sparsegpt_prune(W, stats.hessian, 0.0, keep=keep)[0])
    else:
        W.mul_(keep)
    return tier_map


def _prune_global_tiers_(model: nn.Module, all_stats: dict[str, InputStats] | None, cfg: PruneConfig,
                         result: PruneResult) -> dict[str, torch.Tensor]:
    """Rank every block of the model at once; apply the keep masks (except for SparseGPT, whose OBS walk
    applies them) and return them by module name."""
    linears = named_linears(model)
    Ws = {name: weight_view(m) for name, m in linears.items()}
    scores = [_scores(W, all_stats[name] if all_stats else None, cfg.method) for name, W in Ws.items()]
    selects = [_select(W, s, cfg) for W, s in zip(Ws.values(), scores)]
    maps = [dense_tier_map(tuple(W.shape), cfg.block_size, W.device) for W in Ws.values()]
    total = sum(t.numel() for t in maps)
    n_dense, _, n_topk = target_counts(total, cfg.tiers)
    maps = demote_tiers_global(scores, maps, total - n_dense, n_topk, cfg.block_size, selects)
    keeps = {}
    for (name, W), sel, tier_map in zip(Ws.items(), selects, maps):
        keeps[name] = tier_keep_mask(sel, tier_map, cfg.block_size, cfg.topk)
        result.tier_maps[name] = tier_map.cpu()
    if cfg.method != "sparsegpt":
        for name, W in Ws.items():
            W.mul_(keeps[name])
    return keeps


def prune_model_(model: nn.Module, cfg: PruneConfig, calib_ids: torch.Tensor | None = None, *,
                 batch_size: int = 8, device: str = "cpu", offload: bool = False, compile: bool = False,
                 on_progress: Callable[[int, int], None] | None = None) -> PruneResult:
    """Prune every decoder-layer linear in place; embeddings and the LM head are left alone.

    `compile` runs the calibration forward through torch.compile (Wanda only; see walk_layers).
    """
    result = PruneResult()
    if cfg.method == "none":
        return result
    check_shapes(model, cfg)
    if cfg.needs_calibration and calib_ids is None:
        raise TierpruneError(f"method {cfg.method} needs calibration data (--calib)")
    if cfg.pattern == "tiers" and cfg.scope == "global":
        # A model-wide ranking needs every matrix's scores before any block moves: one walk over
        # the unpruned model (Wanda), or none at all (magnitude). SparseGPT walks a second time.
        stats = None
        walks = 2 if cfg.method == "sparsegpt" else 1
        if cfg.needs_calibration:
            first = None if on_progress is None else (lambda done, total: on_progress(done, walks * total))
            stats = walk_layers(model, calib_ids, None, batch_size=batch_size, device=device, offload=offload,
                                compile=compile, on_progress=first)
        elif not offload:
            model.to(device)
        keeps = _prune_global_tiers_(model, stats, cfg, result)
        if cfg.method == "sparsegpt":
            # The masks are the whole model's ranking, so the OBS update is a second walk (tasks.compensate).
            from .compensate import compensate_demotion_

            second = None if on_progress is None else (lambda done, total: on_progress(total + done, 2 * total))
            compensate_demotion_(model, lambda name, W: keeps[name].to(W.device), calib_ids, batch_size=batch_size,
                                 device=device, offload=offload, on_progress=second)
        return result
    if not cfg.needs_calibration:
        if not offload:
            model.to(device)
        items = list(named_linears(model).items())
        if on_progress is not None:
            on_progress(0, len(items))  # the stage's clock starts now, not after its first matrix
        for i, (name, module) in enumerate(items):
            W = weight_view(module)
            W_dev = W.to(device)  # the same tensor unless offloaded
            tier_map = prune_matrix_(W_dev, None, cfg)
            if W_dev is not W:
                W.copy_(W_dev)
            if tier_map is not None:
                result.tier_maps[name] = tier_map.cpu()
            if on_progress is not None:
                on_progress(i + 1, len(items))
        return result

    prefix = layers_prefix(model)

    def visit(i: int, layer: nn.Module, linears: dict[str, nn.Module], stats: dict[str, InputStats]) -> bool:
        for name, module in linears.items():
            tier_map = prune_matrix_(weight_view(module), stats[name], cfg)
            if tier_map is not None:
                result.tier_maps[f"{prefix}.{i}.{name}"] = tier_map.cpu()
        return True

    walk_layers(model, calib_ids, visit, batch_size=batch_size, device=device, offload=offload,
                hessian=cfg.method == "sparsegpt", compile=compile and cfg.method != "sparsegpt",
                on_progress=on_progress)
    return result
