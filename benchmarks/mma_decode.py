"""GPU benchmark of the tensor-core decode kernel (tierprune/kernels/cuda) against cuBLAS and the op.

For each LLaMA-2-7B shape, tier mix (random placement) and token count: cuBLAS (`F.linear` on the pruned
dense weight), the op as users get it (`hybrid_mm`: the row kernel with the config
mma_decode.rows_decode_config picks, or the flat GEMV at one token where the row kernel's CTAs do not fit),
and the kernel under each `--configs` entry. Then one tier alone at 4096x4096 (all Dense, all 2:4, all
TopK), which shows what each tier costs per block. Timing as benchmarks/hybrid_kernels.py
(CUDA graphs of `--inner` calls over rotated weight copies, medians of `--reps` replays). Correctness is
checked first on odd shapes, every token count and both dtypes. CUDA only. Run:
    python benchmarks/mma_decode.py
    python benchmarks/mma_decode.py --configs 8,12,4 16,12,4 8,16,8 --tokens 1 16 --shapes qkvo
    git show c642ece:kernels/cuda/mma_decode.cu > base.cu   # an older source beside the current one
    python benchmarks/mma_decode.py --kernels rows rows-baseline --baseline-source base.cu --configs 8,6,8 2,6,16
    python benchmarks/mma_decode.py --kernels rows --shapes narrow-qo narrow-kv gqa-kv   # models narrower than 7B
    python benchmarks/mma_decode.py --kernels rows --shapes 13b-qo 13b-up 13b-down         # LLaMA-2-13B
    python benchmarks/mma_decode.py --kernels rows rows-driver-carveout --configs ladder    # the fitted L1 split
    python benchmarks/mma_decode.py --kernels rows-x-row-major rows-x-block-major --configs ladder  # x's layout
    python benchmarks/mma_decode.py --kernels rows-byte-permute rows-sparse-24 --configs ladder     # 2:4 blocks
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

import hybrid_kernels as hk
from tierprune.kernels.cuda import mma_decode as md
from tierprune.kernels.hybrid import hybrid_matmul_ref, pack_hybrid
from tierprune.kernels.triton.hybrid_mm import hybrid_mm

CHECKS = [  # (shape, mix, k, tokens, dtype): edge rows, one tier alone, k up to 32, both token tiles
    ((64, 96), (0.35, 0.45, 0.2), 10, 1, torch.bfloat16), ((48, 208), (0.3, 0.3, 0.4), 10, 5, torch.bfloat16),
    ((200, 512), (0.35, 0.45, 0.2), 16, 16, torch.float16), ((256, 256), (0, 0, 1.0), 32, 9, torch.bfloat16),
    ((256, 256), (1.0, 0, 0), 10, 3, torch.bfloat16), ((256, 256), (0, 1.0, 0), 10, 8, torch.bfloat16),
    ((1000, 4096), (0.2, 0.2, 0.6), 4, 12, torch.bfloat16),
]


# Other models' matrices beside hk.SHAPES, selected by name with --shapes: LLaMA-3.2-1B (hidden 2048, MLP 8192, 8
# KV heads of 64) and LLaMA-3-8B's grouped-query K/V, with fewer block-rows than a GPU's CTA slots; LLaMA-2-13B
# (hidden 5120, MLP 13824), 2-3 and 6-7 block-rows per SM of an H100.
MORE_SHAPES = {
    "narrow-qo 2048x2048": (2048, 2048),
    "narrow-kv 512x2048": (512, 2048),
    "narrow-up 8192x2048": (8192, 2048),
    "narrow-down 2048x8192": (2048, 8192),
    "gqa-kv 1024x4096": (1024, 4096),
    "13b-qo 5120x5120": (5120, 5120),
    "13b-up 13824x5120": (13824, 5120),
    "13b-down 5120x13824": (5120, 13824),
}


def parse_config(text: str) -> md.MmaDecodeConfig | None:
    """'CHUNK,TOPK_CHUNK,WARPS[,NM_CHUNK[,MIN_CTAS]]' (see MmaDecodeConfig), or 'ladder' (None): the config
    mma_decode.rows_decode_config picks for each weight and token count, as the op does."""
    if text == "ladder":
        return None
    values = [int(v) for v in text.split(",")]
    if not 3 <= len(values) <= 5:
        raise ValueError(f"{text!r} is not CHUNK,TOPK_CHUNK,WARPS[,NM_CHUNK[,MIN_CTAS]]")
    config = md.MmaDecodeConfig(*values)
    md.kernel_source(False, 10, 1, config)  # asserts the config's rules
    return config


def weight(shape, mix, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    tier_map = hk.make_tier_map(shape, mix, "random", g)
    hk.TOPK_K = k  # pruned_weight keeps hk.TOPK_K survivors per TopK block
    try:
        W = hk.pruned_weight(shape, tier_map, "cuda", 1).to(dtype)
    finally:
        hk.TOPK_K = 10
    return pack_hybrid(W, tier_map.to("cuda"), topk=k)


KERNELS = {"chunk": md.hybrid_mm_mma, "rows": md.hybrid_mm_rows}


def row_kernel_variant(**replaced):
    """The row kernel with some of mma_decode's module attributes replaced while it compiles and runs, and a module
    cache of its own, so that it is timed side by side with the current kernel in one process."""
    modules: dict = {}

    def run(x, hw, config):
        saved = {name: getattr(md, name) for name in [*replaced, "_MODULES"]}
        for name, value in {**replaced, "_MODULES": modules}.items():
            setattr(md, name, value)
        try:
            return md.hybrid_mm_rows(x, hw, config)
        finally:
            for name, value in saved.items():
                setattr(md, name, value)

    return run


def row_kernel_from(source: Path):
    """The row kernel compiled from another copy of mma_decode.cu (e.g. `git show REV:kernels/cuda/mma_decode.cu`);
    x row-major, as it was read before session 29, when the copy has no X_BLOCK_MAJOR."""
    if "X_BLOCK_MAJOR" not in source.read_text():
        return row_kernel_variant(_SOURCE=source, X_BLOCK_MAJOR_TILES=())
    return row_kernel_variant(_SOURCE=source)


def row_kernel_reading_x(tiles: tuple[int, ...]):
    """The row kernel reading x block-major at these token tiles (1: 1-8 tokens, 2: 9-16), row-major at others."""
    return row_kernel_variant(X_BLOCK_MAJOR_TILES=tiles)


def row_kernel_with_2_4_blocks(sparse: bool):
    """The row kernel with 2:4 blocks on the sparse tensor cores (mma.sp) or spread by byte permutes, at every
    token count (the op: sparse at 1-6 tokens and where x is read block-major)."""
    return row_kernel_variant(SPARSE_24_FORCED=sparse)


def row_kernel_with_the_drivers_carveout():
    """The row kernel as loaded before session 25: the driver's own split of each SM between shared memory and L1,
    not launch.fit_shared_memory_carveout's."""
    return row_kernel_variant(fit_shared_memory_carveout=lambda *args: None)


def label(config: md.MmaDecodeConfig | None) -> str:
    return "ladder" if config is None else ",".join(map(str, config))


def check_correctness(configs, kernels) -> None:
    for (shape, mix, k, T, dtype), config in ((case, c) for case in CHECKS for c in configs):
        hw = weight(shape, mix, k, dtype, seed=1)
        x = (torch.randn(T, shape[1], device="cuda") * 0.5).to(dtype)
        ref = hybrid_matmul_ref(x.float(), hw).float()
        for name in kernels:
            got = KERNELS[name](x, hw, config).float()
            err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
            ok = err <= 1.6e-2 * scale
            print(f"check {name} {shape} mix={mix} k={k} T={T} {str(dtype)[6:]} config {label(config)}: "
                  f"max |error| {err:.3g} of max |y| {scale:.3g} {'ok' if ok else 'WRONG'}", flush=True)
            if not ok:
                raise SystemExit(f"mma_decode: {name} kernel wrong for {shape} {mix} k={k} T={T}")


def timed(hws, x, fn, inner, reps) -> float:
    return hk.measure_us([lambda h=h: fn(x, h) for h in hws], "cuda", inner, reps)[0]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="*", default=["8,12,4"],
                   help="CHUNK,TOPK_CHUNK,WARPS[,NM_CHUNK[,MIN_CTAS]] each, or ladder (the op's pick per weight)")
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--shapes", nargs="*", default=None, help="subset by first word, e.g. qkvo down")
    p.add_argument("--kernels", nargs="*", default=["chunk", "rows"],
                   choices=sorted(KERNELS) + ["rows-baseline", "rows-driver-carveout", "rows-x-row-major",
                                              "rows-x-block-major", "rows-byte-permute", "rows-sparse-24"],
                   help="chunk: a warp per chunk of blocks, sums through a workspace; rows: a CTA per block-row; "
                        "rows-baseline: the row kernel compiled from --baseline-source; rows-driver-carveout: "
                        "the row kernel with the driver's shared-memory/L1 split instead of the fitted one; "
                        "rows-x-row-major / rows-x-block-major: the row kernel reading x (T, in) as it is, or "
                        "transposed to (in/16, tokens, 16) first, at every token count; rows-byte-permute / "
                        "rows-sparse-24: 2:4 blocks spread to dense fragments, or on the sparse tensor cores, at "
                        "every token count")
    p.add_argument("--baseline-source", type=Path, default=None,
                   help="another mma_decode.cu for the rows-baseline kernel, e.g. from `git show REV:...`")
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    try:
        configs = [parse_config(c) for c in args.configs]
    except (AssertionError, TypeError, ValueError) as e:
        p.error(f"bad --configs: {e}")
    if "rows-baseline" in args.kernels:
        if args.baseline_source is None or not args.baseline_source.is_file():
            p.error("rows-baseline needs --baseline-source FILE (a copy of mma_decode.cu)")
        KERNELS["rows-baseline"] = row_kernel_from(args.baseline_source)
    KERNELS["rows-driver-carveout"] = row_kernel_with_the_drivers_carveout()
    KERNELS["rows-x-row-major"] = row_kernel_reading_x(())
    KERNELS["rows-x-block-major"] = row_kernel_reading_x((1, 2))
    KERNELS["rows-byte-permute"] = row_kernel_with_2_4_blocks(False)
    KERNELS["rows-sparse-24"] = row_kernel_with_2_4_blocks(True)
    if not torch.cuda.is_available():
        print("mma_decode: needs a CUDA GPU (sm_80 or newer)", file=sys.stderr)
        raise SystemExit(2)
    if any(not 1 <= T <= md.MMA_DECODE_MAX_TOKENS for T in args.tokens):
        p.error(f"--tokens must be 1..{md.MMA_DECODE_MAX_TOKENS}")
    check_correctness(configs, args.kernels)
    rows = []
    shapes = {n: s for n, s in {**hk.SHAPES, **MORE_SHAPES}.items()
              if (n.split()[0] in args.shapes if args.shapes else n in hk.SHAPES)}
    cases = [(n, s, m) for n, s in shapes.items() for m in hk.MIXES]
    if "qkvo 4096x4096" in shapes:  # one tier alone, what each tier costs per block
        cases += [("qkvo 4096x4096", (4096, 4096), alone) for alone in ("100/0/0", "0/100/0", "0/0/100")]
    mixes = {**hk.MIXES, "100/0/0": (1.0, 0, 0), "0/100/0": (0, 1.0, 0), "0/0/100": (0, 0, 1.0)}
    for shape_name, shape, mix_name in cases:
        hw = weight(shape, mixes[mix_name], 10, torch.bfloat16, zlib.crc32(f"{shape} {mix_name} random".encode()))
        hws = [hw] + [hk.clone_hybrid(hw) for _ in range(hk.copies_needed(hw.nbytes, "cuda") - 1)]
        dense = [hw.to_dense() for _ in range(hk.copies_needed(shape[0] * shape[1] * 2, "cuda"))]
        for T in args.tokens:
            x = (torch.randn(T, shape[1], device="cuda") * 0.5).to(torch.bfloat16)
            cublas = hk.measure_us([lambda w=w: F.linear(x, w) for w in dense], "cuda", args.inner, args.reps)[0]
            op = timed(hws, x, hybrid_mm, args.inner, args.reps)
            kernel = {(name, c): timed(hws, x, lambda x, h, f=KERNELS[name], c=c: f(x, h, c), args.inner, args.reps)
                      for name in args.kernels for c in configs}
            row = dict(shape=shape_name, mix=mix_name, tokens=T, nbytes=hw.nbytes, cublas_us=cublas, op_us=op,
                       kernel_us={f"{name} {label(c)}": us for (name, c), us in kernel.items()})
            rows.append(row)
            for name in args.kernels:
                best = min((key for key in kernel if key[0] == name), key=kernel.get)
                print(f"{shape_name:26} {mix_name:9} T={T:2d}  cuBLAS {cublas:7.2f} us  op {op:7.2f} "
                      f"({cublas / op:.2f}x)  {name} {kernel[best]:7.2f} ({cublas / kernel[best]:.2f}x, "
                      f"{hw.nbytes / kernel[best] / 1e6:.2f} TB/s, best of {len(configs)}: {label(best[1])})",
                      flush=True)
            print(json.dumps(row), flush=True)
        del hws, dense
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
