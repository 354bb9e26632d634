"""Recovery probe: one-shot tiers on SmolLM2-135M, then masked fine-tuning (tasks.training), ppl before/after.

For choosing CPU defaults for the demo: the masks are the pruned weights' non-zeros (this script
only; the pipeline takes them from the store). Calibration and evaluation default to the demo's
quick settings (16 × 512 calibration tokens, WikiText-2 test capped at 16 windows of 512), so the
numbers compare with the demo table in README, not with the PROTOCOL's. Run:
    TIERPRUNE_DATA=../shared/data python benchmarks/recovery_probe.py --ft-tokens 40960 [--json out.json]

Measured (2 CPU cores shared with other jobs, so seconds are inflated; fp32; one-shot Wanda tiers
35/45/20, k=10, sparsity 0.417; ppl on WikiText-2 test, 16 windows of 512; full fine-tuning of the
linears, KD only (kd_weight 1, T 1), constant lr, AdamW without decay, windows 4 × 256 tokens per step):
    dense 36.63, pruned 1498
    --lr 2e-4 --ft-tokens 24576 --ppl-at 2,4,8,16:  2k tok 497, 4k 400, 8k 306, 16k 223, 24k 204
    --lr 5e-4 --ft-tokens 16384 --ppl-at 2,4,8:     2k tok 491, 4k 314, 8k 238, 16k 199
    --lr 1e-4 --ft-tokens 4096:                     4k 460
Fine-tuning ran at about a quarter of the forward-only evaluation's tokens/s (student forward and
backward plus the teacher's forward), i.e. roughly 175 tokens/s on 2 idle cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from tierprune.adapters import weight_view
from tierprune.config import PruneConfig
from tierprune.models import load_model
from tierprune.storage.datasets import load_texts
from tierprune.tasks.calibration import sample_calibration
from tierprune.tasks.evaluate import eval_token_ids, perplexity, sparsity_report
from tierprune.tasks.prune import named_linears, prune_model_
from tierprune.tasks.training import (
    FinetuneConfig,
    calibration_doc_indices,
    check_disjoint,
    finetune_model_,
    finetune_windows,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("TIERPRUNE_DATA", "../shared/data"))
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-max-windows", type=int, default=16)
    parser.add_argument("--val-windows", type=int, default=4, help="WikiText-2 validation windows (held-out loss)")
    parser.add_argument("--tiers", default="0.35,0.45,0.20")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--ft-method", default="full", choices=["full", "lora"])
    parser.add_argument("--ft-tokens", type=int, default=40960)
    parser.add_argument("--ft-seqlen", type=int, default=256)
    parser.add_argument("--ft-batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--schedule", default="constant", choices=["cosine", "linear", "constant"])
    parser.add_argument("--warmup-fraction", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--kd-temperature", type=float, default=1.0)
    parser.add_argument("--train", default="linears", choices=["linears", "all_but_embeddings", "all"])
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0: start and end)")
    parser.add_argument("--ppl-at", default="", help="comma-separated steps at which to also measure ppl, e.g. 4,8,16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    data = Path(args.data)
    loaded = load_model("smollm2-135m", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    c4 = load_texts(f"c4:{data / 'c4-subset'}", "train")
    wiki_test = load_texts(f"wikitext2:{data / 'wikitext-2-raw'}", "test")
    wiki_valid = load_texts(f"wikitext2:{data / 'wikitext-2-raw'}", "validation")
    eval_ids = eval_token_ids("wikitext2", wiki_test, tokenizer, args.eval_seqlen)
    val_ids = eval_token_ids("wikitext2", wiki_valid, tokenizer, args.ft_seqlen)
    val_ids = val_ids[:, : args.val_windows * args.ft_seqlen].reshape(args.val_windows, args.ft_seqlen)

    def ppl() -> float:
        return perplexity(model, eval_ids, args.eval_seqlen, max_windows=args.eval_max_windows)[0]

    record: dict = {"settings": vars(args)}
    t0 = time.perf_counter()
    record["ppl_dense"] = ppl()
    record["eval_seconds"] = time.perf_counter() - t0
    teacher = copy.deepcopy(model) if args.kd_weight > 0 else None

    calib_ids = sample_calibration(c4, tokenizer, args.calib_samples, args.calib_seqlen, seed=0)
    tiers = tuple(float(f) for f in args.tiers.split(","))
    t0 = time.perf_counter()
    prune_model_(model, PruneConfig(method="wanda", pattern="tiers", tiers=tiers, topk=args.topk), calib_ids)
    record["prune_seconds"] = time.perf_counter() - t0
    masks = {name: weight_view(m) != 0 for name, m in named_linears(model).items()}
    record["sparsity"] = sparsity_report(model)["sparsity"]
    record["ppl_pruned"] = ppl()

    # Fine-tuning data: the C4 documents the calibration draw never used, checked against the eval text.
    used = calibration_doc_indices(c4, tokenizer, args.calib_samples, args.calib_seqlen, seed=0)
    t0 = time.perf_counter()
    check_disjoint([t for i, t in enumerate(c4) if i not in set(used)], wiki_test)
    record["disjoint_check_seconds"] = time.perf_counter() - t0
    train_ids = finetune_windows(c4, tokenizer, args.ft_seqlen, args.ft_tokens, exclude_docs=used, seed=0)
    cfg = FinetuneConfig(method=args.ft_method, seqlen=args.ft_seqlen, batch_size=args.ft_batch_size,
                         grad_accum=args.grad_accum, lr=args.lr, schedule=args.schedule,
                         warmup_fraction=args.warmup_fraction, weight_decay=args.weight_decay,
                         kd_weight=args.kd_weight, kd_temperature=args.kd_temperature, train=args.train,
                         lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank, eval_every=args.eval_every,
                         commit_every=1 if args.ppl_at else 0)
    ppl_at = {int(s) for s in args.ppl_at.split(",") if s}
    curve = record["ppl_curve"] = [(0, 0, record["ppl_pruned"])]  # (step, tokens, ppl)

    def measure(state) -> None:  # the model mid-training (full fine-tuning: its weights are the trained ones)
        if state.step in ppl_at and args.ft_method == "full":
            t = time.perf_counter()
            model.eval()
            curve.append((state.step, state.step * args.ft_batch_size * args.grad_accum * args.ft_seqlen, ppl()))
            model.train()
            record["curve_eval_seconds"] = record.get("curve_eval_seconds", 0.0) + time.perf_counter() - t
            print(f"step {curve[-1][0]}: {curve[-1][1]} tokens, ppl {curve[-1][2]:.1f}", flush=True)

    result = finetune_model_(model, masks, train_ids, cfg, teacher=teacher, val_ids=val_ids, on_step=measure)
    ft_seconds = result.seconds - record.get("curve_eval_seconds", 0.0)
    record.update(ft_steps=result.steps, ft_tokens=result.tokens, ft_seconds=ft_seconds,
                  ft_tokens_per_second=result.tokens / ft_seconds, val_losses=result.val_losses,
                  train_loss_first=result.losses[:5], train_loss_last=result.losses[-5:])
    leaked = sum(int((weight_view(m)[~masks[n]] != 0).sum()) for n, m in named_linears(model).items())
    record["pruned_weights_nonzero_after"] = leaked
    record["ppl_finetuned"] = ppl()
    record["seconds"] = time.perf_counter() - started
    text = json.dumps(record, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
