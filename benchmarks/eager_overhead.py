"""Host time per eager call of a HybridLinear against nn.Linear: what a model without CUDA graphs pays per layer.

A small weight (default 256 x 256, 35/45/20) keeps the GPU far ahead of the host, so --calls back-to-back calls
divided into their wall time give the host's cost per call (the kernels queue behind it). Three ways:
- nn.Linear (cuBLAS), the dense baseline;
- HybridLinear as a model calls it: the eager fast path (a prepared row-kernel launch);
- the `tierprune::hybrid_mm` op called directly, as torch.compile without CUDA graphs runs it.
Prints microseconds per call, median of --rounds rounds. Run on a GPU:
    python benchmarks/eager_overhead.py --tokens 1 4 16
    python benchmarks/eager_overhead.py --tiny      # a CPU dry run: the pure-torch path, no timing value
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import hybrid_kernels as hk
from tierprune.hybrid_linear import HybridLinear
from tierprune.kernels.hybrid import HYBRID_TENSOR_NAMES


def per_call_us(call, x: torch.Tensor, calls: int, rounds: int) -> float:
    """Median over rounds of wall time / calls, in microseconds, for `calls` calls queued back to back."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(3):  # compiles, prepares the launch, warms the allocator
        call(x)
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            call(x)
        sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=[256, 256], metavar=("OUT", "IN"))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="64 x 64, 20 calls, 2 rounds: a dry run (CPU is fine)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.calls, args.rounds = [64, 64], 20, 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    shape = tuple(args.shape)
    tier_map = hk.make_tier_map(shape, hk.MIXES["35/45/20"], "random", g)
    W = torch.randn(shape, generator=g)
    W = (W * hk.tier_keep_mask(W.abs(), tier_map, hk.BS, hk.TOPK_K)).to(torch.bfloat16)
    dense = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16)
    dense.weight.copy_(W)
    hybrid = HybridLinear.from_linear(dense, tier_map, block_size=hk.BS, topk=hk.TOPK_K).to(device)  # packs on the CPU
    dense = dense.to(device)
    hw = hybrid.hybrid_weight()
    tensors = [getattr(hw, name) for name in HYBRID_TENSOR_NAMES]

    def through_op(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tierprune.hybrid_mm(x, *tensors, hw.shape[0], hw.shape[1], hw.block_size, hw.topk)

    rows = {}
    for T in args.tokens:
        x = torch.randn(1, T, shape[1], generator=g).to(torch.bfloat16).to(device)
        torch.testing.assert_close(hybrid(x).float(), dense(x).float(), rtol=2e-2, atol=2e-2 * dense(x).abs().max())
        rows[T] = {name: round(per_call_us(call, x, args.calls, args.rounds), 2)
                   for name, call in (("nn.Linear", dense), ("HybridLinear", hybrid), ("op", through_op))}
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"{name}; torch {torch.__version__}; {shape[0]}x{shape[1]}, 35/45/20, bf16; host us per call, "
          f"median of {args.rounds} rounds of {args.calls} calls")
    for T, row in rows.items():
        print(f"  {T:3} tokens  " + "  ".join(f"{k} {v:8.2f}" for k, v in row.items()))
    print(json.dumps({str(T): row for T, row in rows.items()}))
    return rows


if __name__ == "__main__":
    main()
