"""Step 4 of a progressive iteration: realise the tier table in the weights (and, later, recover).

Also the prunable weights as a flat tensor dict, so that an iteration's model can be cached as one
safetensors file and restored onto a freshly loaded base model.
"""
from __future__ import annotations

from typing import Literal

import pandas as pd
import torch
from torch import nn

from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError
from tierprune.kernels.scores import magnitude_scores, wanda_scores
from tierprune.kernels.tiers import dense_tier_map, tier_keep_mask

from .prune import named_linears
from .tier_tables import tier_maps_from_table

__all__ = ["apply_tiers_", "finetune_", "prunable_state", "load_prunable_state_"]

_MISMATCH = "tier map / checkpoint does not match the model's shapes"


@torch.no_grad()
def apply_tiers_(model: nn.Module, tiers: pd.DataFrame, stats: dict[str, torch.Tensor] | None, *,
                 block_size: int = 16, topk: int = 10, select: Literal["wanda", "magnitude"] = "wanda") -> None:
    """Zero, in place, the weights each block's tier removes; Dense blocks are left untouched.

    Inside 2:4 and TopK blocks the survivors are the highest Wanda scores |W|·sqrt(S) (stats: module
    -> S (in,)), or the highest |W| with select="magnitude" (stats may then be None). Weights already
    zero score 0, so re-applying a table keeps earlier survivors and is idempotent.
    """
    if select not in ("wanda", "magnitude"):
        raise ValueError(f"select must be 'wanda' or 'magnitude', got {select!r}")
    maps = tier_maps_from_table(tiers)
    linears = named_linears(model)
    if set(maps) != set(linears):
        missing, extra = sorted(set(linears) - set(maps)), sorted(set(maps) - set(linears))
        raise TierpruneError(f"{_MISMATCH}: modules without a tier map {missing[:3]}, unknown modules {extra[:3]}")
    for name, module in linears.items():
        W = weight_view(module)  # (out, in), in-place edits reach the module
        tier_map = maps[name]
        if tier_map.shape != dense_tier_map(tuple(W.shape), block_size).shape:
            raise TierpruneError(f"{_MISMATCH}: {name} has weight (out, in) {tuple(W.shape)}, "
                                 f"tier map {tuple(tier_map.shape)} of blocks of {block_size}")
        if select == "magnitude":
            chooser = magnitude_scores(W)
        else:
            if stats is None or name not in stats:
                raise TierpruneError(f"no activation statistics for {name} (select='wanda' needs them)")
            chooser = wanda_scores(W, stats[name].to(W.device))
        W.mul_(tier_keep_mask(chooser, tier_map.to(W.device), block_size, topk))


def finetune_(model: nn.Module, tiers: pd.DataFrame, stats: dict[str, torch.Tensor] | None, *,
              block_size: int = 16, topk: int = 10, select: Literal["wanda", "magnitude"] = "wanda",
              epochs: int = 0) -> dict:
    """Recovery step after a demotion. For now it ONLY re-applies the tier masks (apply_tiers_).

    No training happens yet: the recovery fine-tuning (masked updates that keep pruned weights at
    zero) is added by its own issue; `epochs` is recorded, not run.
    """
    apply_tiers_(model, tiers, stats, block_size=block_size, topk=topk, select=select)
    return {"epochs_requested": epochs, "epochs_run": 0, "note": "masks re-applied; fine-tuning not implemented yet"}


def prunable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of every prunable linear's weight, as stored, keyed '<module>.weight'."""
    return {f"{name}.weight": m.weight.detach().to("cpu", copy=True).contiguous()
            for name, m in named_linears(model).items()}


@torch.no_grad()
def load_prunable_state_(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a prunable_state dict back into the model in place; keys, shapes and dtypes must match."""
    linears = named_linears(model)
    expected = {f"{name}.weight" for name in linears}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise TierpruneError(f"{_MISMATCH}: checkpoint lacks {missing[:3]}, has unknown {extra[:3]}")
    for name, m in linears.items():
        t = tensors[f"{name}.weight"]
        if t.shape != m.weight.shape:
            raise TierpruneError(f"{_MISMATCH}: {name} weight is {tuple(m.weight.shape)}, "
                                 f"checkpoint {tuple(t.shape)}")
        if t.dtype != m.weight.dtype:
            raise TierpruneError(f"checkpoint weight of {name} is {t.dtype}, the model's is {m.weight.dtype}")
        m.weight.copy_(t)
