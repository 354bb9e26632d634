"""One-shot prune-and-evaluate, as plain functions: load → calibrate/prune → evaluate → save."""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from tierprune.config import TierpruneConfig
from tierprune.errors import TierpruneError
from tierprune.models import (LoadedModel, check_window_lengths, load_model, refuse_model_folder_as_output,
                              refuse_other_model_in_folder, resolve_model)
from tierprune.storage.checkpoints import save_pretrained_dir
from tierprune.storage.datasets import default_data_spec, evaluation_split, load_texts
from tierprune.storage.tables import save_table

from .calibration import sample_calibration
from .evaluate import eval_token_ids, perplexity, sparsity_report
from .placement import placed_for_inference
from .prune import check_shapes, prune_model_, tier_maps_from_zeros
from .tier_tables import tier_table
from .zeroshot import load_zero_shot_tasks, zero_shot_accuracy

__all__ = ["default_data_spec", "tier_table", "run_oneshot"]

# Progress callback: (stage, done, total)
Progress = Callable[[str, int, int], None]


def _data_kind(spec: str) -> str:
    return spec.split(":", 1)[0]


def run_oneshot(cfg: TierpruneConfig, output: str | None = None, progress: Progress | None = None,
                loaded: LoadedModel | None = None) -> dict:
    """Prune cfg.model as cfg.prune says, evaluate, optionally save; returns the result record."""
    def tick(stage: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(stage, done, total)) if progress else None

    started = time.perf_counter()
    p, c, e = cfg.prune, cfg.calibration, cfg.eval
    if output and Path(output).is_file():
        raise TierpruneError(f"--output {output} is a file; give a directory")
    if loaded is None:
        resolve_model(cfg.model.name, cfg.model.gguf_file)  # a mistyped model path fails before data is fetched
    refuse_model_folder_as_output(output, cfg.model.name, cfg.model.gguf_file)
    refuse_other_model_in_folder(output, dense=True, packed=False)
    # Read the data before the slow steps, so a bad path fails in seconds, not after pruning.
    calib_texts = load_texts(c.data, "train") if p.needs_calibration else None
    eval_texts = load_texts(e.data, evaluation_split(e.data)) if e.data else None
    # A misspelt task or a dataset that cannot be had fails here, not after pruning.
    zero_shot_tasks = load_zero_shot_tasks(e.zero_shot, e.zero_shot_include) if e.zero_shot else None
    loaded = loaded or load_model(cfg.model.name, cfg.model.gguf_file, cfg.model.dtype, cfg.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    check_window_lengths(model, {**({"--calib-seqlen": c.seqlen} if calib_texts is not None else {}),
                                 **({"--eval-seqlen": e.seqlen} if eval_texts is not None else {})})
    if p.method != "none":
        check_shapes(model, p)  # before calibration, which takes minutes at the protocol's size

    calib_ids = None
    if calib_texts is not None:
        calib_ids = sample_calibration(calib_texts, tokenizer, c.nsamples, c.seqlen, c.seed)
    eval_ids = None
    if eval_texts is not None:
        eval_ids = eval_token_ids(_data_kind(e.data), eval_texts, tokenizer, e.seqlen, e.max_windows)
        if eval_ids.shape[1] < e.seqlen:  # before pruning, so that it fails in seconds
            raise TierpruneError(f"evaluation text {e.data} has {eval_ids.shape[1]} tokens, "
                                 f"fewer than one window of --eval-seqlen {e.seqlen}")
    torch.manual_seed(c.seed)
    t0 = time.perf_counter()
    result = prune_model_(model, p, calib_ids, batch_size=c.batch_size, device=cfg.device, offload=cfg.offload,
                          compile=c.compile, on_progress=tick("prune"))
    prune_seconds = time.perf_counter() - t0

    # Patterns without tier maps (and a pruned --model with --method none) report the tiers their zeros fit.
    report = sparsity_report(model, result.tier_maps or tier_maps_from_zeros(model, p.block_size, p.topk))
    record = {
        "model": loaded.source,
        "method": p.method, "pattern": p.pattern,
        "sparsity": report["sparsity"], "tiers": report["tiers"],
        "prune_seconds": prune_seconds,
        "settings": cfg.model_dump(mode="json"),
    }
    record["ppl"] = None
    evaluates = eval_ids is not None or bool(e.zero_shot)
    # Placed once for both: offloaded, the layers that do not fit are streamed and everything moves back after.
    with placed_for_inference(model, cfg.device, cfg.offload) if evaluates else nullcontext():
        if eval_ids is not None:
            ppl, windows = perplexity(model, eval_ids, e.seqlen, max_windows=e.max_windows,
                                      batch_size=e.batch_size, device=cfg.device, on_progress=tick("eval"))
            record.update(ppl=ppl, eval_windows=windows, eval_tokens=windows * e.seqlen)
        if e.zero_shot:
            record["zero_shot"] = zero_shot_accuracy(model, tokenizer, e.zero_shot, limit=e.zero_shot_limit,
                                                     on_progress=tick("zero-shot"), task_dict=zero_shot_tasks)
    record["seconds"] = time.perf_counter() - started
    record["modules"] = report["modules"]
    if output:
        save_pretrained_dir(model.cpu(), tokenizer, output)
        if result.tier_maps:
            save_table(tier_table(result.tier_maps), f"{output.rstrip('/')}/tier_maps.parquet")
    return record
