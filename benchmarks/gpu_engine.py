"""GPU benchmark of the engine on a randomly initialised LLaMA-2-7B-shaped model.

Prints measured numbers, nothing else:
  1. score + two-phase demotion (tier maps) for all 224 linears, and the same plus the mask applied;
  2. calibration (activation statistics) of nsamples × seqlen tokens, against its FLOP floor.

The FLOP floor is the forward FLOPs of one pass over the calibration tokens (every linear,
2·params·tokens, plus causal attention, 2·L²·d per layer and sequence), divided by the GPU's
dense bf16 peak (--peak-tflops; 989 for an H100 SXM). Run:
    python benchmarks/gpu_engine.py [--layers 32] [--nsamples 128] [--seqlen 2048]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from tierprune.adapters import weight_view
from tierprune.kernels.scores import wanda_scores
from tierprune.kernels.tiers import demote_tiers, dense_tier_map, target_counts, tier_keep_mask
from tierprune.tasks.layerwise import walk_layers
from tierprune.tasks.prune import named_linears


def build_model(layers: int, device: str, hidden: int = 4096, intermediate: int = 11008):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=4096, use_cache=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        if p.dim() == 2:  # matrices random, norms stay at 1
            p.data.normal_(0, 0.02)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device: str, repeats: int = 3) -> float:
    fn()  # warm-up: allocator, kernel selection
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_demotion(model, device: str, fractions=(0.35, 0.45, 0.20), block_size: int = 16, k: int = 10) -> dict:
    linears = named_linears(model)
    Ws = [weight_view(m) for m in linears.values()]
    # Calibration statistics stand in as random positive vectors: the cost does not depend on them.
    Ss = [torch.rand(W.shape[1], device=device) + 0.1 for W in Ws]

    def score_and_demote():
        maps = []
        for W, S in zip(Ws, Ss):
            scores = wanda_scores(W, S)
            tier_map = dense_tier_map(tuple(W.shape), block_size, device)
            n_dense, _, n_topk = target_counts(tier_map.numel(), fractions)
            maps.append(demote_tiers(scores, tier_map, tier_map.numel() - n_dense, n_topk, block_size))
        return maps

    def score_demote_and_mask():
        for W, S in zip(Ws, Ss):
            scores = wanda_scores(W, S)
            tier_map = dense_tier_map(tuple(W.shape), block_size, device)
            n_dense, _, n_topk = target_counts(tier_map.numel(), fractions)
            tier_map = demote_tiers(scores, tier_map, tier_map.numel() - n_dense, n_topk, block_size)
            tier_keep_mask(scores, tier_map, block_size, k)  # not applied: repeats must see the same W

    # Where the time goes, op by op, summed over all matrices (each op timed on its own).
    from tierprune.kernels.masks import nm_mask
    from tierprune.kernels.scores import block_mean, masked_block_mean

    scores = [wanda_scores(W, S) for W, S in zip(Ws[:7], Ss[:7])]  # one layer's worth, x32 below
    scale = len(Ws) / 7
    ops = {
        "wanda_scores": lambda: [wanda_scores(W, S) for W, S in zip(Ws[:7], Ss[:7])],
        "block_mean": lambda: [block_mean(x, block_size) for x in scores],
        "nm_mask": lambda: [nm_mask(x, 2, 4) for x in scores],
        "masked_block_mean": lambda: [masked_block_mean(x, nm_mask(x, 2, 4), block_size) for x in scores],
    }
    breakdown = {name: timed(fn, device) * scale for name, fn in ops.items()}
    return {
        "linears": len(Ws),
        "weights": sum(W.numel() for W in Ws),
        "score_demote_s": timed(score_and_demote, device),
        "score_demote_mask_s": timed(score_demote_and_mask, device),
        "breakdown_s": breakdown,
    }


def forward_flops(model, nsamples: int, seqlen: int) -> float:
    cfg = model.config
    linear_params = sum(weight_view(m).numel() for m in named_linears(model).values())
    tokens = nsamples * seqlen
    attention = cfg.num_hidden_layers * nsamples * 2 * seqlen * seqlen * cfg.hidden_size  # causal: half of 4·L²·d
    return 2 * linear_params * tokens + attention


def bench_calibration(model, device: str, nsamples: int, seqlen: int, batch_size: int, peak_tflops: float,
                      compile: bool = False) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (nsamples, seqlen))
    t0 = time.perf_counter()
    walk_layers(model, ids[: batch_size], None, batch_size=batch_size, device=device, compile=compile)  # warm-up
    sync(device)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = walk_layers(model, ids, None, batch_size=batch_size, device=device, compile=compile)
    sync(device)
    seconds = time.perf_counter() - t0
    # The same layers with no statistics: what the model's own forward costs here.
    from tierprune.tasks.layerwise import _run_layer, capture_layer_inputs
    from tierprune.adapters import decoder_layers

    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        inputs = capture_layer_inputs(model, ids, batch_size, device)
        for i, layer in enumerate(decoder_layers(model)):
            inputs.hidden = [_run_layer(layer, i, h, inputs) for h in inputs.hidden]
    sync(device)
    forward_only = time.perf_counter() - t0
    flops = forward_flops(model, nsamples, seqlen)
    floor = flops / (peak_tflops * 1e12)
    assert all(s.n_samples == nsamples for s in stats.values())
    return {"compile": compile, "warmup_s": warmup, "tokens": nsamples * seqlen, "seconds": seconds,
            "forward_only_s": forward_only,
            "attn_implementation": model.config._attn_implementation, "tflop": flops / 1e12,
            "achieved_tflops": flops / seconds / 1e12, "floor_s": floor, "ratio_to_floor": seconds / floor}


def matmul_tflops(device: str, n: int = 8192) -> float:
    """Measured dense bf16 matmul throughput: the achievable peak, beside the spec sheet's."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = timed(lambda: [a @ b for _ in range(10)], device) / 10
    return 2 * n ** 3 / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time calibration with torch.compile'd layers")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run with small shapes")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    args = parser.parse_args()
    device = args.device
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    model = build_model(args.layers, device, args.hidden, args.intermediate)
    result = {"demotion": bench_demotion(model, device)}
    print(json.dumps(result["demotion"]), flush=True)
    if not args.skip_calibration:
        result["calibration"] = bench_calibration(model, device, args.nsamples, args.seqlen, args.batch_size,
                                                  args.peak_tflops)
        print(json.dumps(result["calibration"]), flush=True)
        if args.compile:
            result["calibration_compiled"] = bench_calibration(model, device, args.nsamples, args.seqlen,
                                                               args.batch_size, args.peak_tflops, compile=True)
        if device.startswith("cuda"):
            measured = matmul_tflops(device)
            for key in ("calibration", "calibration_compiled"):
                if key in result:
                    cal = result[key]
                    cal["measured_matmul_tflops"] = measured
                    cal["ratio_to_measured_floor"] = cal["seconds"] / (cal["tflop"] / measured)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
