"""A usable model out of a run: one finished iteration as a folder that plain transformers loads.

The folder holds the model (safetensors, `AutoModelForCausalLM.from_pretrained(DIR)`), its tokenizer,
`tier_maps.parquet` (the schema of `prune --output`) and `masks.safetensors` (the keep masks as bits).
The weights are the iteration's checkpoint with its stored masks applied, and are checked to obey
the tier map: at most 2 non-zeros in every group of 4 of a 2:4 block, at most k in a TopK block.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from prefect import task

from tierprune.adapters import weight_view
from tierprune.config import ModelConfig, TierpruneConfig
from tierprune.errors import TierpruneError
from tierprune.kernels.tiers import tier_violations
from tierprune.models import load_model, refuse_model_folder_as_output, refuse_other_model_in_folder
from tierprune.storage.checkpoints import load_checkpoint, save_pretrained_dir
from tierprune.storage.runstore import RunStore
from tierprune.storage.tables import remove_file, save_file

from .demote import read_masks
from .finetune import apply_masks_
from .prune import named_linears
from .run_state import model_tensors
from .runs import run_summary
from .tier_tables import tier_maps_from_table

__all__ = ["LoadedIteration", "load_iteration", "export_run", "export_path", "check_export_target"]


@dataclass
class LoadedIteration:
    """One finished iteration of a run, loaded on the CPU: the model with its stored masks applied."""

    model: nn.Module
    tokenizer: object
    tier_table: pd.DataFrame
    masks_bytes: bytes | None
    row: dict  # the iteration's run_summary row
    dtype: str
    block_size: int
    topk: int


def load_iteration(store: RunStore, iteration: int | None = None) -> LoadedIteration:
    """Iteration `iteration` (default: the last finished) of a run; refuses weights that break the tier map."""
    rows = run_summary(store)
    if not rows:
        raise TierpruneError(f"run {store.uri} has no finished iteration to export")
    if iteration is None:
        row = rows[-1]
    else:
        found = [r for r in rows if r["iteration"] == iteration]
        if not found:
            raise TierpruneError(f"run {store.uri} has no finished iteration {iteration} "
                                 f"(finished: {', '.join(str(r['iteration']) for r in rows)})")
        row = found[0]
    record = store.read_object(row["record"], "iteration.json")
    if record["checkpoint"]["rel"] in store.pruned_steps():
        kept = ", ".join(map(str, store.pruned()["kept"]))
        raise TierpruneError(f"iteration {row['iteration']} of run {store.uri} had its checkpoint deleted by "
                             f"`tierprune runs prune` or --keep-checkpoints (kept: iterations {kept})")
    ckpt_uri, tiers_uri = (f"{store.uri}/{record[k]['rel']}" for k in ("checkpoint", "tiers"))
    cfg = TierpruneConfig.model_validate(store.manifest()["config"])
    index = store.read_object(ckpt_uri, "checkpoint.json")
    dtype = next(iter(index["tensors"].values()))["dtype"]  # the run's dtype, whatever machine exports it
    loaded = load_model(cfg.model.name, cfg.model.gguf_file, dtype, "cpu")
    tensors = model_tensors(loaded.model)
    if set(tensors) != set(index["tensors"]):
        raise TierpruneError(f"the checkpoint of {row['uri']} does not fit model {cfg.model.name!r}")
    with torch.no_grad():
        for name, value in load_checkpoint(store, index):
            tensors[name].copy_(value)
    tier_table = store.read_object(tiers_uri, "tiers.parquet")
    masks_bytes = store.read(tiers_uri, "masks.safetensors") if "masks.safetensors" in record["tiers"]["files"] else None
    if masks_bytes is not None:
        apply_masks_(loaded.model, read_masks(masks_bytes))
    maps = tier_maps_from_table(tier_table)
    prune = cfg.prune
    for name, module in named_linears(loaded.model).items():
        groups, blocks = tier_violations(weight_view(module), maps[name], prune.block_size, prune.topk)
        if groups or blocks:
            raise TierpruneError(f"{name} does not obey its tier map ({groups} 2:4 groups, {blocks} TopK blocks "
                                 "over their budget): the run's masks are damaged")
    return LoadedIteration(loaded.model, loaded.tokenizer, tier_table, masks_bytes, row, dtype,
                           prune.block_size, prune.topk)


def export_path(template: str, run: str, flag: str = "--export") -> str:
    """The export folder of run `run`: `{run}` in the path becomes the run's name, so that a scheduled deployment's
    nightly runs (`{flow}-{deployment}-{date}`) each keep their own model instead of overwriting one folder."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise TierpruneError(f"{flag} {template}: {exc}") from None
    if fields - {"run"}:
        raise TierpruneError(f"{flag} {template}: unknown field(s) {', '.join(sorted(fields - {'run'}))}; "
                             "use {run} (the run's name)")
    return template.format(run=run)


def check_export_target(output: str, model: ModelConfig, flag: str = "--output") -> None:
    """Refuse (one line) an export folder that would replace the run's own base model or sit beside a packed one."""
    refuse_model_folder_as_output(output, model.name, model.gguf_file, flag=flag)
    refuse_other_model_in_folder(output, dense=True, packed=False, flag=flag)


def export_run(store: RunStore, output: str, iteration: int | None = None) -> dict:
    """Write iteration `iteration` (default: the last finished) of a run to `output`; returns what was written."""
    check_export_target(output, TierpruneConfig.model_validate(store.manifest()["config"]).model)  # before loading
    it = load_iteration(store, iteration)
    save_pretrained_dir(it.model, it.tokenizer, output)
    save_file(it.tier_table, f"{output.rstrip('/')}/tier_maps.parquet")
    masks_uri = f"{output.rstrip('/')}/masks.safetensors"
    if it.masks_bytes is not None:
        save_file(it.masks_bytes, masks_uri)
    else:  # the dense iteration 0 has no masks: an earlier export's masks would describe another model
        remove_file(masks_uri)
    row = it.row
    return {"iteration": row["iteration"], "output": output, "ppl": row["ppl"], "sparsity": row["sparsity"],
            "tiers": row["tiers"], "dtype": it.dtype}


@task(name="export")
def export_task(state, output: str) -> dict:
    """The run's last finished iteration as a model folder at `output` (the flow's `export` parameter)."""
    return export_run(state.store, output)
