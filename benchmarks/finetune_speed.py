"""Training throughput of the recovery fine-tuning loop (tasks.training.finetune_model_) on a device.

A randomly initialised model of SmolLM2-135M's shape (or --layers/--hidden/... of your own), random keep
masks at 42% sparsity on every linear, random token windows, and a frozen copy as the teacher: speed
does not depend on the weights. Each variant runs a few warm-up steps, then --steps timed ones through
finetune_model_ itself, and prints ms per optimizer step and training tokens per second.
--profile also prints torch.profiler's top operators by device time for the first variant.

    python benchmarks/finetune_speed.py --device cuda \
        --variants full-kd:16x512,full-kd:16x512:compile,full-kd:16x512:compile:hidden,lora-kd:16x512
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from tierprune.config import FinetuneConfig
from tierprune.tasks.prune import named_linears
from tierprune.tasks.training import finetune_model_
from tierprune.adapters import weight_view


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         tie_word_embeddings=True, max_position_embeddings=8192, use_cache=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return LlamaForCausalLM(config).to(dtype).to(args.device).eval()


def random_masks(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    masks = {}
    for name, module in named_linears(model).items():
        shape = weight_view(module).shape
        masks[name] = (torch.rand(shape, generator=gen) >= sparsity).to(module.weight.device)
    return masks


def run_variant(model, teacher, masks, spec: str, args) -> dict:
    method_loss, shape, *options = spec.split(":")
    method, loss = method_loss.split("-")
    batch, seqlen = (int(v) for v in shape.split("x"))
    # options: compile (regional torch.compile), hidden (the per-layer hidden-state loss, weight 1; uses the teacher)
    cfg = FinetuneConfig(method=method, kd_weight=1.0 if loss == "kd" else 0.0, batch_size=batch, seqlen=seqlen,
                         lr=1e-4, commit_every=0, compile="compile" in options,
                         hidden_weight=1.0 if "hidden" in options else 0.0)
    used_teacher = teacher if cfg.kd_weight or cfg.hidden_weight else None
    work = copy.deepcopy(model)
    ids = torch.randint(0, args.vocab, ((args.warmup + args.steps) * batch, seqlen))
    started = time.perf_counter()  # the warm-up steps include a compile's tracing and code generation
    finetune_model_(work, masks, ids[: args.warmup * batch], cfg, teacher=used_teacher)
    warmup_seconds = time.perf_counter() - started
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = finetune_model_(work, masks, ids[args.warmup * batch:], cfg, teacher=used_teacher)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    return {"variant": spec, "steps": result.steps, "ms_per_step": 1000 * seconds / result.steps,
            "tokens_per_s": result.tokens / seconds, "peak_gib": peak, "warmup_s": warmup_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default="full-kd:16x512,full-ce:16x512,lora-kd:16x512,full-kd:32x512",
                        help="METHOD-LOSS:BATCHxSEQLEN[:compile][:hidden], comma separated; METHOD full|lora, "
                             "LOSS kd|ce; :compile = --ft-compile, :hidden = --kd-hidden-weight 1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--mlp", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args()

    model = build_model(args)
    teacher = copy.deepcopy(model).requires_grad_(False)
    masks = random_masks(model, 0.42)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters on {args.device}", flush=True)
    print("| variant | steps | ms/step | tokens/s | peak GiB | warm-up s |\n|---|---|---|---|---|---|", flush=True)
    for spec in args.variants.split(","):
        r = run_variant(model, teacher, masks, spec.strip(), args)
        print(f"| {r['variant']} | {r['steps']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_gib']:.1f} | {r['warmup_s']:.1f} |", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        spec = args.variants.split(",")[0].strip()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            run_variant(model, teacher, masks, spec, argparse.Namespace(**{**vars(args), "steps": 5, "warmup": 1}))
        key = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))


if __name__ == "__main__":
    main()
