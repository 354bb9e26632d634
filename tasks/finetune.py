"""Step 4 of a progressive iteration: make the weights obey the stored keep masks (and, later, recover).

The masks are the demote step's stored data (tasks.demote.keep_masks): applying them zeroes every
weight a block's tier removed, including one that drifted away from zero in memory. Recovery
training between iterations is its own issue; until then `epochs` is recorded, not run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from prefect import task
from torch import nn

from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError

from .prune import named_linears
from .refs import ArtifactRef, committed_or_compute, store_cache_policy

if TYPE_CHECKING:
    from .demote import PackedMasks
    from .run_state import RunState

__all__ = ["apply_masks_", "finetune_", "finetune_task"]


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: PackedMasks) -> set[str]:
    """Zero, in place, every weight its module's keep mask removes; returns the names of the weights touched."""
    linears = named_linears(model)
    if set(masks) != set(linears):
        missing, extra = sorted(set(linears) - set(masks)), sorted(set(masks) - set(linears))
        raise TierpruneError(f"masks do not match the model: modules without a mask {missing[:3]}, "
                             f"unknown modules {extra[:3]}")
    for name, module in linears.items():
        W = weight_view(module)  # (out, in), in-place edits reach the module
        mask = masks.mask(name, W.device)
        if mask.shape != W.shape:
            raise TierpruneError(f"the mask of {name} is {tuple(mask.shape)}, its weight (out, in) {tuple(W.shape)}")
        W.mul_(mask)
    return {f"{name}.weight" for name in linears}


def finetune_(model: nn.Module, masks: PackedMasks, *, epochs: int = 0) -> tuple[set[str], dict]:
    """Recovery step after a demotion. For now it ONLY applies the stored masks (no training yet).

    Returns the names of the tensors changed and a record of what was done.
    """
    changed = apply_masks_(model, masks)
    return changed, {"epochs_requested": epochs, "epochs_run": 0,
                     "note": "stored masks applied; fine-tuning not implemented yet"}


# ---------------------------------------------------------------------------- the Prefect step
def _finetune_material(p: dict) -> dict:
    state = p["state"]
    return {"checkpoint": p["checkpoint"].digest, "tiers": p["tiers"].digest,
            "epochs": state.plan.step(p["iteration"]).epochs}


@task(name="finetune", persist_result=True, cache_policy=store_cache_policy("checkpoint", _finetune_material))
def finetune_task(state: RunState, iteration: int, checkpoint: ArtifactRef, tiers: ArtifactRef) -> ArtifactRef:
    """The next checkpoint: the model at `checkpoint` with the masks of `tiers` applied; only changed tensors written."""
    record: dict = {}

    def compute() -> tuple[dict, dict[str, int]]:
        loaded = state.model_at(checkpoint)
        masks = state.masks_of(tiers)
        if masks is None:
            raise TierpruneError(f"{tiers.uri} holds no keep masks to apply")
        try:
            changed, done = finetune_(loaded.model, masks, epochs=state.plan.step(iteration).epochs)
            record.update(done)
            index, blobs = state.save_checkpoint(changed)
        except BaseException:
            state.forget_model_state()  # half-changed weights must never pass for a checkpoint
            raise
        return {"checkpoint.json": index}, blobs

    material = _finetune_material({"state": state, "iteration": iteration, "checkpoint": checkpoint, "tiers": tiers})
    return committed_or_compute(state.store, iteration, "checkpoint", material, compute, record)
