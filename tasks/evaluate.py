"""Evaluation: perplexity with the reference protocol, and the sparsity report.

WikiText-2: the test rows joined with "\\n\\n", tokenized once, cut into non-overlapping windows of
`seqlen` tokens (remainder dropped), batch 1, ppl = exp(mean window loss). C4: the reference's
validation text, the first 1,100 documents joined with " ", truncated to 256 windows.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from prefect import task
from torch import nn

from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError
from tierprune.kernels.tiers import TIER_NAMES, tier_counts

from .placement import placed_for_inference
from .prune import named_linears
from .refs import ArtifactRef, committed_or_compute, store_cache_policy

if TYPE_CHECKING:
    from .run_state import RunState

__all__ = ["eval_token_ids", "perplexity", "sparsity_report", "evaluate_task", "read_eval"]


# Tokens tokenized past the last one used when only a prefix of the corpus is: a cut can change only the tokens
# next to it (a word or a run of whitespace split in two), never hundreds of tokens before it.
PREFIX_MARGIN_TOKENS = 256


def eval_token_ids(kind: str, texts: list[str], tokenizer, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(1, T) token ids of an evaluation corpus, as the reference builds it. Where fewer tokens are used (c4's 256
    windows, or max_windows), only a prefix of the texts long enough for them is tokenized, and its first tokens
    are returned: those of the whole corpus (the whole of WikiText-2's test split takes seconds; a quick run's few
    windows need a few lines)."""
    texts, separator, used = (texts[:1100], " ", 256 * seqlen) if kind == "c4" else (texts, "\n\n", None)
    if max_windows is not None:
        used = min(used or max_windows * seqlen, max_windows * seqlen)
    if used is None:
        return tokenizer(separator.join(texts), return_tensors="pt").input_ids
    count = 1
    while True:
        ids = tokenizer(separator.join(texts[:count]), return_tensors="pt").input_ids
        if count >= len(texts) or ids.shape[1] >= used + PREFIX_MARGIN_TOKENS:
            return ids[:, :used]
        # Grow by the tokens per text seen so far, with a quarter to spare: 2 to 4 times as many texts (the first few
        # may be empty lines, which tell nothing), or all of them once the estimate, made on 64 tokens or more, needs
        # half (c4's 256 windows of 2048 take most of its 1,100 documents: tokenized about once, not over and over).
        estimate = int(1.25 * (used + PREFIX_MARGIN_TOKENS) * count / max(ids.shape[1], 1)) + 1
        if ids.shape[1] >= 64 and 2 * estimate >= len(texts):
            count = len(texts)
        else:
            count = max(2 * count, min(4 * count, estimate))


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, *, max_windows: int | None = None,
               batch_size: int = 1, device: str = "cpu",
               on_progress: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """(ppl, windows used) over non-overlapping `seqlen` windows of ids (1, T)."""
    n_windows = ids.shape[1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:  # user input (data, --eval-seqlen): a one-line error, not a traceback
        raise TierpruneError(f"evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    # On the device once, and the losses kept there until the end: a copy from pageable host memory, or a
    # loss read back, per window would make the host wait for the device at every window, where a small
    # model's forward is bound by the host launching its kernels and could run ahead.
    windows = ids[:, : n_windows * seqlen].reshape(n_windows, seqlen).to(device)
    losses = []
    if on_progress is not None:
        on_progress(0, n_windows)  # the stage's clock starts now, not after its first batch
    for start in range(0, n_windows, batch_size):
        x = windows[start:start + batch_size]
        logits = model(x, use_cache=False).logits  # (b, L, V)
        # Loss per window, in fp32, mean over its L-1 shifted positions: as the reference. Classes in the last
        # dimension: with them in dimension 1 (a transposed view) CUDA's log-softmax takes a strided path
        # that cost ~0.2 s a window on an H200, 30x the model's forward.
        b, length = x.shape
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(),
                               reduction="none").view(b, length - 1).mean(dim=1)
        losses.append(loss)
        if on_progress is not None:
            on_progress(min(start + batch_size, n_windows), n_windows)
    return math.exp(torch.cat(losses).cpu().double().mean().item()), n_windows


def sparsity_report(model: nn.Module, tier_maps: dict[str, torch.Tensor] | None = None) -> dict:
    """Zeros per prunable module and overall; tier fractions (of blocks) per module and overall."""
    tier_maps = tier_maps or {}
    modules, zeros, total = {}, 0, 0
    tier_total = torch.zeros(3, dtype=torch.long)
    for name, module in named_linears(model).items():
        W = weight_view(module)
        z, n = int((W == 0).sum()), W.numel()
        zeros, total = zeros + z, total + n
        entry = {"shape": list(W.shape), "sparsity": z / n}
        if name in tier_maps:
            counts = tier_counts(tier_maps[name]).cpu()
            tier_total += counts
            entry["tiers"] = {t: c / counts.sum().item() for t, c in zip(TIER_NAMES, counts.tolist())}
        modules[name] = entry
    n_blocks = tier_total.sum().item()
    tiers = {t: (c / n_blocks if n_blocks else (1.0 if t == "dense" else 0.0))
             for t, c in zip(TIER_NAMES, tier_total.tolist())}
    return {"sparsity": zeros / max(total, 1), "prunable_params": total, "tiers": tiers, "modules": modules}


# ---------------------------------------------------------------------------- the Prefect step
def _eval_material(p: dict) -> dict:
    state = p["state"]
    return {"checkpoint": p["checkpoint"].digest, "tiers": p["tiers"].digest, "eval": state.identity["eval"],
            "model": state.identity["model"]}


def _eval_ids(state: RunState, tokenizer) -> torch.Tensor:
    # Every iteration evaluates on the same text: tokenize it once per run state (seconds each time).
    from tierprune.storage.datasets import evaluation_split, load_texts

    e = state.cfg.eval
    if state.eval_ids is None:
        state.eval_ids = eval_token_ids(e.data.split(":", 1)[0], load_texts(e.data, evaluation_split(e.data)),
                                        tokenizer, e.seqlen, e.max_windows)
    return state.eval_ids


@task(name="evaluate", persist_result=True, cache_policy=store_cache_policy("eval", _eval_material))
def evaluate_task(state: RunState, iteration: int, checkpoint: ArtifactRef, tiers: ArtifactRef) -> ArtifactRef:
    """Sparsity, tier fractions, perplexity, zero-shot accuracy and recovery in % of dense, committed as eval.json."""
    from tierprune.progress import report as report_progress

    from .recovery import recovery_of
    from .tier_tables import tier_maps_from_table

    def compute() -> dict:
        loaded = state.model_at(checkpoint)
        maps = tier_maps_from_table(state.store.read_object(tiers.uri, "tiers.parquet"))
        report = sparsity_report(loaded.model, maps)
        record = {"iteration": iteration, "sparsity": report["sparsity"], "tiers": report["tiers"], "ppl": None}
        e, device = state.cfg.eval, state.cfg.device
        with placed_for_inference(loaded.model, device, state.cfg.offload):
            if e.data:
                ppl, windows = perplexity(
                    loaded.model, _eval_ids(state, loaded.tokenizer), e.seqlen, max_windows=e.max_windows,
                    batch_size=e.batch_size, device=device,
                    on_progress=lambda d, t: report_progress(f"iteration {iteration}: evaluate", d, t))
                record.update(ppl=ppl, eval_windows=windows, eval=e.model_dump(mode="json"))
            if e.zero_shot:
                from .zeroshot import zero_shot_accuracy

                record["zero_shot"] = zero_shot_accuracy(
                    loaded.model, loaded.tokenizer, e.zero_shot, limit=e.zero_shot_limit,
                    include_path=e.zero_shot_include,
                    on_progress=lambda d, t: report_progress(f"iteration {iteration}: zero-shot", d, t))
        record["recovery"] = recovery_of(state, iteration, record)
        return {"eval.json": record}

    material = _eval_material({"state": state, "checkpoint": checkpoint, "tiers": tiers})
    return committed_or_compute(state.store, iteration, "eval", material, compute)


def read_eval(state: RunState, ref: ArtifactRef) -> dict:
    """The eval record of a committed evaluate step."""
    return state.store.read_object(ref.uri, "eval.json")
