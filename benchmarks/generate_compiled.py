"""transformers' own `generate`, dense vs hybrid, eager and compiled: what `tierprune generate [--compile]` runs.

A randomly initialised LLaMA (transformers' LlamaForCausalLM; size from the flags), bf16, its decoder linears
pruned to random 35/45/20 tier maps, and a copy of it with HybridLinear layers. Each is timed on --rounds
greedy generations of --tokens tokens (batch 1; the median, and the range) after an untimed one of the same
length: eager (a dynamic KV cache, one launch per op; the two models' rounds alternate), and compiled (a static
cache and transformers' compiled decode step: inductor, "reduce-overhead", so CUDA graphs on a GPU). Prints
tokens/s and the ratios. Run:
    python benchmarks/generate_compiled.py                              # a GPU: hidden 2048, 8 layers
    python benchmarks/generate_compiled.py --hidden 4096 --inter 11008 --layers 32
    python benchmarks/generate_compiled.py --inter 8192 --layers 16 --heads 32 --kv-heads 8   # LLaMA-3.2-1B's shapes
    python benchmarks/generate_compiled.py --tiny                       # a CPU dry run (no timing value)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import hybrid_kernels as hk
from tierprune.hybrid_linear import HybridLinear


def make_model(hidden: int, inter: int, layers: int, heads: int, vocab: int, device: str,
               kv_heads: int | None = None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=vocab,
                         max_position_embeddings=1024)
    with torch.device(device):  # initialised where it runs: a 7B model's random init on the CPU takes minutes
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def prune_(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every decoder linear to a random 35/45/20 tier map (k = 10); returns the maps by module name."""
    g = torch.Generator().manual_seed(0)
    tier_maps = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                tier_map = hk.make_tier_map(tuple(module.weight.shape), hk.MIXES["35/45/20"], "random", g)
                tier_map = tier_map.to(module.weight.device)
                module.weight.mul_(hk.tier_keep_mask(module.weight.float().abs(), tier_map, hk.BS, hk.TOPK_K))
                tier_maps[name] = tier_map
    return tier_maps


def to_hybrid_(model: torch.nn.Module, tier_maps: dict[str, torch.Tensor]) -> None:
    for name, tier_map in tier_maps.items():
        parent, attr = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, attr, HybridLinear.from_linear(getattr(owner, attr), tier_map, block_size=hk.BS, topk=hk.TOPK_K))


@torch.no_grad()
def timed_generations(models: dict[str, torch.nn.Module], prompt: torch.Tensor, tokens: int, compiled: bool,
                      rounds: int = 3) -> dict[str, dict]:
    """tokens/s of each model's greedy generation: the median of `rounds`, after an untimed one of the same length
    (it compiles, captures and warms the allocator). Eager rounds alternate between the models, as the host that
    paces eager decode is noisy; compiled models are timed one after the other, each freshly compiled."""
    from transformers import CompileConfig

    settings = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True, pad_token_id=0,
                    attention_mask=torch.ones_like(prompt))
    if compiled:
        config = CompileConfig()
        config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        settings.update(cache_implementation="static", compile_config=config)
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    rates, outputs = {name: [] for name in models}, {name: [] for name in models}
    for group in ([[name] for name in models] if compiled else [list(models)]):
        torch._dynamo.reset()
        for name in group:
            outputs[name].append(models[name].generate(prompt, **settings)[0, prompt.shape[1]:].tolist())
        for _ in range(rounds):
            for name in group:
                sync()
                start = time.perf_counter()
                generated = models[name].generate(prompt, **settings)
                sync()
                rates[name].append(tokens / (time.perf_counter() - start))
                outputs[name].append(generated[0, prompt.shape[1]:].tolist())
    # "repeatable": every generation of a model (the untimed one too) gave the same tokens
    return {name: {"tokens_per_s": statistics.median(r), "range": (min(r), max(r)), "token_ids": outputs[name][-1],
                   "repeatable": all(ids == outputs[name][0] for ids in outputs[name])} for name, r in rates.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5504)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query K/V heads (default: --heads)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, 4 tokens: a dry run (CPU is fine)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--rounds", type=int, default=3, help="timed generations each; the median is reported")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.inter, args.layers, args.heads, args.tokens, args.rounds = 64, 128, 2, 4, 4, 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dense = make_model(args.hidden, args.inter, args.layers, args.heads, 32000, device, args.kv_heads)
    tier_maps = prune_(dense)
    hybrid = copy.deepcopy(dense)
    to_hybrid_(hybrid, tier_maps)
    prompt = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    runs = {}
    for mode in args.modes:
        timed = timed_generations({"dense": dense, "hybrid": hybrid}, prompt, args.tokens, mode == "compiled",
                                  args.rounds)
        runs.update({f"{kind} {mode}": result for kind, result in timed.items()})
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    kv = f", {args.kv_heads} of {args.heads} heads for K/V" if args.kv_heads else ""
    print(f"{name}; torch {torch.__version__}; hidden {args.hidden}, MLP {args.inter}, {args.layers} layers{kv}, "
          f"35/45/20, bf16, batch 1, {args.tokens} new tokens after a 16-token prompt")
    for mode in args.modes:
        dense, hybrid = runs[f"dense {mode}"], runs[f"hybrid {mode}"]
        same = dense["token_ids"] == hybrid["token_ids"]
        low, high = dense["range"]
        print(f"  {mode:9} dense {dense['tokens_per_s']:8.1f} tokens/s ({low:.1f}-{high:.1f})  "
              f"hybrid {hybrid['tokens_per_s']:8.1f} ({hybrid['range'][0]:.1f}-{hybrid['range'][1]:.1f})  "
              f"hybrid / dense {hybrid['tokens_per_s'] / dense['tokens_per_s']:.3f}  the same tokens: {same}; "
              f"each model's {args.rounds + 1} generations alike: dense {dense['repeatable']}, "
              f"hybrid {hybrid['repeatable']}")
    summary = {k: round(v["tokens_per_s"], 2) for k, v in runs.items()}
    print(json.dumps(summary))
    return runs


if __name__ == "__main__":
    main()
