"""Time the OBS update of `--obs-update` (kernels.sparsegpt with a fixed mask) on one linear, both ways.

The column-by-column sweep (the CPU's form) against the triangular solves (the GPU's form), on random
correlated inputs and a random 60%-kept mask, for SmolLM2-135M's and LLaMA-2-7B's linear shapes. Prints the
milliseconds of each (after one warm-up call) and the largest difference between their results.

    python benchmarks/obs_sweep.py --device cuda
    python benchmarks/obs_sweep.py --device cpu --shapes 576x576,1536x576
"""
from __future__ import annotations

import argparse
import time

import torch

from tierprune.kernels import sparsegpt

SHAPES = "576x576,1536x576,576x1536,4096x4096,11008x4096,4096x11008"  # (out, in)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_both(rows: int, cols: int, device: str, dtype: torch.dtype, tokens: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    X = (torch.randn(tokens, cols // 4, device=device, generator=g) @ torch.randn(cols // 4, cols, device=device,
                                                                                  generator=g)
         + 0.3 * torch.randn(tokens, cols, device=device, generator=g))
    H = torch.zeros(cols, cols, device=device)
    sparsegpt.accumulate_hessian(H, 0, X)
    W = torch.randn(rows, cols, device=device, generator=g).to(dtype)
    keep = torch.rand(rows, cols, device=device, generator=g) > 0.4
    chosen = sparsegpt._solve_fixed_masks_on
    results = {}
    try:
        for form, solves in (("solves", True), ("columns", False)):
            sparsegpt._solve_fixed_masks_on = lambda _device, solves=solves: solves
            sparsegpt.sparsegpt_prune(W, H, 0.0, keep=keep)  # warm-up
            _sync(device)
            start = time.perf_counter()
            out, _ = sparsegpt.sparsegpt_prune(W, H, 0.0, keep=keep)
            _sync(device)
            results[form] = (time.perf_counter() - start, out.float())
    finally:
        sparsegpt._solve_fixed_masks_on = chosen
    return {"shape": f"{rows}x{cols}", "solves_ms": round(results["solves"][0] * 1e3, 1),
            "columns_ms": round(results["columns"][0] * 1e3, 1),
            "speedup": round(results["columns"][0] / results["solves"][0], 1),
            "max_diff": float((results["solves"][1] - results["columns"][1]).abs().max())}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=SHAPES, help="comma list of OUTxIN")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens of the Gram matrix")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        parser.error(f"--shapes: expected OUTxIN[,OUTxIN...], got {args.shapes!r}")
    rows = []
    for out_features, in_features in shapes:
        row = time_both(out_features, in_features, args.device, getattr(torch, args.dtype), args.tokens)
        print(f"{row['shape']}: solves {row['solves_ms']} ms, columns {row['columns_ms']} ms, "
              f"{row['speedup']}x, max difference {row['max_diff']:.2e}", flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
