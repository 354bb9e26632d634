"""Step 1 of a progressive iteration: the input statistics S of every prunable linear, as a table.

One layer-by-layer calibration walk over the model as it is now (earlier iterations' pruning
included); nothing is pruned here. S_j = (1/N)·Σ over all calibration tokens of x_j², N = number
of sequences, as the reference Wanda keeps it (see kernels.scores).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from prefect import task
from torch import nn

from .layerwise import walk_layers
from .refs import ArtifactRef, committed_or_compute, store_cache_policy
from .tier_tables import layer_of

if TYPE_CHECKING:
    from .run_state import RunState

__all__ = ["ACTIVATION_COLUMNS", "collect_activations", "activation_stats", "collect_activations_task"]

# layer int32, module str, in_features int32, sq_norm list<float32> (in_features,), n_tokens, n_samples int64
ACTIVATION_COLUMNS = ["layer", "module", "in_features", "sq_norm", "n_tokens", "n_samples"]


def collect_activations(model: nn.Module, calib_ids: torch.Tensor, *, batch_size: int = 8,
                        device: str | torch.device = "cpu", offload: bool = False, compile: bool = False,
                        on_progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """One row per prunable linear, in layer order; calib_ids (n_samples, seqlen) int64.

    walk_layers moves the model to `device` and leaves it there; offloaded, one layer at a time goes there,
    and the model stays where it lives.
    """
    stats = walk_layers(model, calib_ids, None, batch_size=batch_size, device=device, offload=offload,
                        compile=compile, on_progress=on_progress)
    names = list(stats)
    sq_norms = [stats[n].sq_norm.detach().float().cpu().numpy() for n in names]  # (in,) each
    return pd.DataFrame({
        "layer": np.array([layer_of(n) for n in names], dtype=np.int32),
        "module": pd.Series(names, dtype="str"),
        "in_features": np.array([s.size for s in sq_norms], dtype=np.int32),
        "sq_norm": pd.Series(sq_norms, dtype=object),
        "n_tokens": np.array([stats[n].n_tokens for n in names], dtype=np.int64),
        "n_samples": np.array([stats[n].n_samples for n in names], dtype=np.int64),
    })


def activation_stats(df: pd.DataFrame) -> dict[str, torch.Tensor]:
    """module -> S (in_features,) fp32 CPU, from a collect_activations table (or its Parquet copy)."""
    out: dict[str, torch.Tensor] = {}
    for name, in_features, sq_norm in zip(df["module"], df["in_features"], df["sq_norm"]):
        S = torch.from_numpy(np.asarray(sq_norm, dtype=np.float32).copy())
        if S.numel() != int(in_features):
            raise ValueError(f"sq_norm of {name} has {S.numel()} values, in_features says {int(in_features)}")
        out[str(name)] = S
    return out


# ---------------------------------------------------------------------------- the Prefect step
def _activations_material(p: dict) -> dict:
    state = p["state"]
    return {"checkpoint": p["checkpoint"].digest, "calibration": state.identity["calibration"],
            "model": state.identity["model"]}


@task(name="collect-activations", persist_result=True,
      cache_policy=store_cache_policy("activations", _activations_material))
def collect_activations_task(state: RunState, iteration: int, checkpoint: ArtifactRef) -> ArtifactRef:
    """Calibrate the model at `checkpoint` layer by layer; the statistics table, committed."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from tierprune.faults import crash_point
    from tierprune.progress import report as report_progress
    from .calibration import run_calibration_windows

    def compute() -> dict:
        loaded = state.model_at(checkpoint)
        c = state.cfg.calibration
        ids = run_calibration_windows(state, loaded.tokenizer)
        progress = create_progress_artifact(0.0, description=f"iteration {iteration}: layers calibrated")

        def on_progress(done: int, total: int) -> None:
            update_progress_artifact(progress, 100.0 * done / total)
            report_progress(f"iteration {iteration}: calibrate", done, total)
            crash_point(f"step:iter-{iteration:03d}/activations:layer-{done}")  # tests only (tierprune.faults)

        df = collect_activations(loaded.model, ids, batch_size=c.batch_size, device=state.cfg.device,
                                 offload=state.cfg.offload, compile=c.compile, on_progress=on_progress)
        return {"activations.parquet": df}

    material = _activations_material({"state": state, "checkpoint": checkpoint})
    return committed_or_compute(state.store, iteration, "activations", material, compute)
