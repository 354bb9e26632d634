"""Per-iteration report: tier-map heatmaps (matplotlib) and the Prefect artifacts that show them."""
from __future__ import annotations

import base64
import io

import pandas as pd
from prefect import task

from .tier_tables import tier_maps_from_table

__all__ = ["layer_heatmap_png", "report_markdown", "report_task"]

_TIER_COLORS = ["#2b8cbe", "#fdae61", "#d7191c"]  # Dense, 2:4, TopK


def layer_heatmap_png(tier_maps: dict[str, "object"], layer: int) -> bytes:
    """One PNG: the tier map of every module of one decoder layer, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    names = [n for n in tier_maps if f".{layer}." in f".{n}."]
    fig, axes = plt.subplots(1, len(names), figsize=(2.0 * len(names), 2.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.imshow(tier_maps[name].numpy(), cmap=ListedColormap(_TIER_COLORS), vmin=0, vmax=2,
                  interpolation="nearest", aspect="auto")
        ax.set_title(name.rsplit(".", 1)[-1], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"layer {layer}: blue Dense, orange 2:4, red TopK", fontsize=9, y=1.08)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def report_markdown(iteration: int, record: dict, tiers: pd.DataFrame) -> str:
    """Markdown with the iteration's numbers and one embedded heatmap per layer."""
    maps = tier_maps_from_table(tiers)
    layers = sorted(tiers["layer"].unique().tolist())
    fractions = ", ".join(f"{k} {v:.3f}" for k, v in record["tiers"].items())
    ppl = "n/a" if record.get("ppl") is None else f"{record['ppl']:.3f}"
    lines = [f"# Iteration {iteration}", "", f"- perplexity: {ppl}", f"- sparsity: {record['sparsity']:.4f}",
             f"- tier fractions (blocks): {fractions}", ""]
    for layer in layers:
        png = base64.b64encode(layer_heatmap_png(maps, layer)).decode()
        lines.append(f"![layer {layer}](data:image/png;base64,{png})")
    return "\n".join(lines)


@task(name="report")
def report_task(state, iteration: int, evaluation, tiers_ref, seconds: float) -> dict:
    """Prefect artifacts for one iteration: a table row and the markdown heatmap report.

    seconds: the compute time the iteration's steps recorded when committed (a rerun shows the same).
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    record = state.store.read_object(evaluation.uri, "eval.json")
    tiers = state.store.read_object(tiers_ref.uri, "tiers.parquet")
    row = {"iteration": iteration, **{f"tier {k}": round(v, 4) for k, v in record["tiers"].items()},
           "sparsity": round(record["sparsity"], 4), "ppl": record.get("ppl"), "seconds": round(seconds, 1)}
    create_table_artifact([row], key=f"iteration-{iteration}", description=f"iteration {iteration}")
    create_markdown_artifact(report_markdown(iteration, record, tiers), key=f"tier-maps-{iteration}",
                             description=f"tier maps after iteration {iteration}")
    return row
