"""Per-iteration report: tier-map heatmaps (matplotlib) and the Prefect artifacts that show them."""
from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import torch
from prefect import task

from .runs import in_tier_order
from .tier_tables import tier_maps_from_table

__all__ = ["layer_heatmap_png", "report_markdown", "report_row", "report_task"]

_TIER_COLORS = ["#2b8cbe", "#fdae61", "#d7191c"]  # Dense, 2:4, TopK
_PALETTE = np.array([[0x2B, 0x8C, 0xBE], [0xFD, 0xAE, 0x61], [0xD7, 0x19, 0x1C], [0xFF, 0xFF, 0xFF]], dtype=np.uint8)


def _panel(tier_map: torch.Tensor, target: int = 96) -> np.ndarray:
    """(h, w, 3) uint8 picture of one tier map at about `target` pixels on its long side: a pixel of a large
    map blends the colours of the blocks it covers (so 20% TopK reads as 20% red); a small map is enlarged."""
    onehot = torch.nn.functional.one_hot(tier_map.long().clamp(0, 2), 3).permute(2, 0, 1)[None].float()  # (1,3,r,c)
    step = max(1, -(-max(tier_map.shape) // target))
    if step > 1:
        onehot = torch.nn.functional.avg_pool2d(onehot, step, step, ceil_mode=True)
    rgb = torch.einsum("bthw,tc->hwc", onehot, torch.from_numpy(_PALETTE[:3]).float()).round().to(torch.uint8)
    scale = max(1, target // max(rgb.shape[:2]))
    return np.kron(rgb.numpy(), np.ones((scale, scale, 1), dtype=np.uint8))


def layer_heatmap_png(tier_maps: dict[str, torch.Tensor], layer: int) -> bytes:
    """One PNG: the tier map of every module of one decoder layer, side by side (left to right as listed)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.image

    names = [n for n in tier_maps if f".{layer}." in f".{n}."]
    panels = [_panel(tier_maps[n]) for n in names]
    height = max(p.shape[0] for p in panels)
    white = np.full((height, 4, 3), 255, dtype=np.uint8)
    row = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]
    picture = np.concatenate([c for p in row for c in (p, white)][:-1], axis=1)
    # Straight to PNG, no figure: a 7B model has 32 layers, and a matplotlib figure each took ~0.3 s.
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, picture, format="png")
    return buf.getvalue()


def report_markdown(iteration: int, record: dict, tiers: pd.DataFrame) -> str:
    """Markdown with the iteration's numbers and one embedded heatmap per layer."""
    maps = tier_maps_from_table(tiers)
    layers = sorted(tiers["layer"].unique().tolist())
    fractions = ", ".join(f"{k} {v:.3f}" for k, v in record["tiers"].items())
    ppl = "n/a" if record.get("ppl") is None else f"{record['ppl']:.3f}"
    recovery = (record.get("recovery") or {}).get("ppl")
    lines = [f"# Iteration {iteration}", "", f"- perplexity: {ppl}"
             + ("" if recovery is None else f" ({recovery:.1f}% of dense)"), f"- sparsity: {record['sparsity']:.4f}",
             f"- tier fractions (blocks): {fractions}", "",
             "Tier maps, blue Dense, orange 2:4, red TopK; one row of blocks per 16 output rows.", ""]
    for layer in layers:
        png = base64.b64encode(layer_heatmap_png(maps, layer)).decode()
        modules = ", ".join(n.rsplit(".", 1)[-1] for n in maps if f".{layer}." in f".{n}.")
        lines += [f"**layer {layer}** ({modules})", "", f"![layer {layer}](data:image/png;base64,{png})", ""]
    return "\n".join(lines)


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def report_row(store, iteration: int, record: dict, seconds: float, checkpoint=None) -> dict:
    """One iteration's row of the run's table, from its evaluation record (eval.json) and fine-tuning step.

    seconds: the compute time the iteration's steps recorded when committed (a rerun shows the same).
    checkpoint: the iteration's finetune step, whose record holds the ppl before fine-tuning and the tokens trained.
    """
    tiers = in_tier_order(record["tiers"])  # a stored record's JSON has its keys sorted: 2:4 first
    row = {"iteration": iteration, **{f"tier {k}": round(v, 4) for k, v in tiers.items()},
           "sparsity": round(record["sparsity"], 4)}
    if checkpoint is not None:
        trained = store.step_meta(checkpoint.uri)
        tokens = trained.get("tokens", 0)
        row.update({"ppl before ft": trained.get("ppl_before_finetune") if tokens else record.get("ppl"),
                    "ft tokens": tokens})
    row.update({"ppl": record.get("ppl"), "recovery %": _rounded((record.get("recovery") or {}).get("ppl"), 1)})
    if record.get("zero_shot"):
        row["zero-shot acc"] = _rounded(record["zero_shot"]["mean_acc"], 4)
        row["zero-shot recovery %"] = _rounded((record.get("recovery") or {}).get("zero_shot_mean_acc"), 1)
    row["seconds"] = round(seconds, 1)
    return row


@task(name="report")
def report_task(state, iteration: int, evaluation, tiers_ref, seconds: float, checkpoint=None) -> dict:
    """Prefect artifacts for one iteration: its table row (report_row) and the markdown heatmap report."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    record = state.store.read_object(evaluation.uri, "eval.json")
    row = report_row(state.store, iteration, record, seconds, checkpoint)
    # Ordered for the markdown (a copy: the store may hand back the object it committed).
    record = {**record, "tiers": in_tier_order(record["tiers"])}
    tiers = state.store.read_object(tiers_ref.uri, "tiers.parquet")
    create_table_artifact([row], key=f"iteration-{iteration}", description=f"iteration {iteration}")
    create_markdown_artifact(report_markdown(iteration, record, tiers), key=f"tier-maps-{iteration}",
                             description=f"tier maps after iteration {iteration}")
    return row
