"""Compensate a demotion: the weights a demotion keeps make up for the ones it removes (`--obs-update`).

SparseGPT's OBS update (kernels.sparsegpt) with the demote step's masks fixed in advance: decoder layer
by layer, over the calibration windows, each linear's removed weights are zeroed and their error is
spread onto the kept weights of the same row, through the inverse Gram matrix of the linear's inputs,
so that its output on those windows changes as little as possible. The layers are walked in order,
so each is compensated for inputs that already come out of the compensated layers before it (the
reference's sequential order). What goes is decided elsewhere and unchanged: the tier map and the
Wanda choice inside each block (tasks.demote.keep_masks); afterwards the masks hold exactly.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tierprune.adapters import layers_prefix, weight_view
from tierprune.kernels.sparsegpt import sparsegpt_prune

from .layerwise import InputStats, walk_layers
from .prune import named_linears

__all__ = ["compensate_demotion_"]

# (full module name, its (out, in) weight view) -> the bool keep mask (out, in) on the weight's device
KeepOf = Callable[[str, torch.Tensor], torch.Tensor]


@torch.no_grad()
def compensate_demotion_(model: nn.Module, keep_of: KeepOf, calib_ids: torch.Tensor, *, batch_size: int = 8,
                         device: str | torch.device = "cpu", offload: bool = False,
                         on_progress: Callable[[int, int], None] | None = None) -> set[str]:
    """Apply every linear's keep mask in place with OBS updates of the kept weights; returns the weights changed.

    keep_of: e.g. PackedMasks.mask_for (a run's stored masks), or masks just computed in memory.
    calib_ids (n_samples, seqlen) int64: the calibration windows whose layer inputs give the Gram matrices.
    """
    prefix = layers_prefix(model)

    def visit(index: int, layer: nn.Module, layer_linears: dict[str, nn.Module],
              stats: dict[str, InputStats]) -> bool:
        for name, module in layer_linears.items():
            W = weight_view(module)  # (out, in); in-place edits reach the module
            updated, _ = sparsegpt_prune(W, stats[name].hessian, 0.0, keep=keep_of(f"{prefix}.{index}.{name}", W))
            W.copy_(updated)
        return True  # the next layer's inputs come out of this compensated one

    walk_layers(model, calib_ids, visit, batch_size=batch_size, device=device, offload=offload, hessian=True,
                on_progress=on_progress)
    return {f"{name}.weight" for name in named_linears(model)}
