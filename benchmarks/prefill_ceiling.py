"""How fast a GEMM that does less tensor work per 2:4 block could be at prefill: the GPU's own rates, and how
much of a pruned model's tier maps the sparse tensor cores could take.

GPU part (CUDA): the rate of mma.sync m16n8k16 (dense), mma.sp m16n8k16 and mma.sp m16n8k32 (bf16; TFLOPS as
dense-equivalent work, a sparse m16n8k32 counting 2*16*8*32 flops), from kernels that issue nothing else; cuBLAS
(F.linear) at --tokens tokens on the LLaMA-2-7B shapes; and the op's prefill (unpack + cuBLAS) at 35/45/20. From
these, for each mix, the bound of a GEMM that picks per 16x16 block: dense blocks at the mma.sync rate, 2:4 and
TopK blocks two by two at the m16n8k32 sparse rate (a lone one costs a dense block: m16n8k16 sparse is no faster
than dense). Warpgroup-wide wgmma (what cuBLAS runs on Hopper) takes 64 rows at once: 4 block-rows. On sm_90 also
the rates of wgmma m64n256k16 (dense) and wgmma.sp m64n256k32, A from shared memory (SS) or registers (RS), and
per shape the bound of a GEMM of 64-row tiles on this random map (block-rows grouped, --tier-table's "grouped"):
a pair of block columns runs sparse where none of the group's blocks there is dense.

Tier-map part (CPU, --tier-table FILE: a run's tier table, `tiers.parquet` of an iteration in its store): per
matrix, the tensor work left (1 = dense) by a per-block sparse GEMM (2:4 and TopK blocks paired within a
block-row, any two columns), and by 64-row sparse tiles (wgmma.sp m64nNk32: 4 block-rows x 2 block columns, all
sparse) with block-rows in their order and grouped four by four by their dense columns (greedy), block columns
paired freely inside each group. TopK blocks count as sparse (a few break 2:4: docs/kernels.md).

Run:
    python benchmarks/prefill_ceiling.py                       # on a GPU
    python benchmarks/prefill_ceiling.py --tier-table runs/demo-local/.../tiers.parquet   # anywhere
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

BOUND_MIXES = {"35/45/20": (0.35, 0.45, 0.20), "90/10/0": (0.90, 0.10, 0.0), "0/100/0": (0.0, 1.0, 0.0)}

# One instruction kind in a loop over 8 independent accumulators: its issue rate and nothing else.
_RATE_SOURCE = r"""
typedef unsigned int u32;
#define LOOP(ASM) float acc[8][4] = {}; \
    for (int i = 0; i < iters; ++i) { _Pragma("unroll") for (int j = 0; j < 8; ++j) ASM } \
    float s = 0.f; for (int j = 0; j < 8; ++j) s += acc[j][0] + acc[j][1] + acc[j][2] + acc[j][3]; \
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
#define C "+f"(acc[j][0]), "+f"(acc[j][1]), "+f"(acc[j][2]), "+f"(acc[j][3])
extern "C" __global__ void mma_dense(float* out, int iters) {
    const u32 a = threadIdx.x * 3u, b = a ^ 7u;
    LOOP(asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                      "{%8,%9}, {%0,%1,%2,%3};" : C : "r"(a), "r"(a + 1), "r"(a + 2), "r"(a + 5), "r"(b), "r"(b + 2));)
}
extern "C" __global__ void mma_sparse_k16(float* out, int iters) {
    const u32 a = threadIdx.x * 3u, b = a ^ 7u, e = 0x44444444u;
    LOOP(asm volatile("mma.sp.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6,%7}, "
                      "{%0,%1,%2,%3}, %8, 0x0;" : C : "r"(a), "r"(a + 1), "r"(b), "r"(b + 2), "r"(e));)
}
extern "C" __global__ void mma_sparse_k32(float* out, int iters) {
    const u32 a = threadIdx.x * 3u, b = a ^ 7u, e = 0x44444444u;
    LOOP(asm volatile("mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                      "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
                      : C : "r"(a), "r"(a + 1), "r"(a + 2), "r"(a + 5), "r"(b), "r"(b + 2), "r"(b + 4), "r"(b + 6),
                        "r"(e));)
}
"""
_RATE_KERNELS = {"mma_dense": 2 * 16 * 8 * 16, "mma_sparse_k16": 2 * 16 * 8 * 16, "mma_sparse_k32": 2 * 16 * 8 * 32}

# Hopper's warpgroup instructions (sm_90a): two warpgroups per CTA, each 4 wgmma on one 64 x 256 accumulator per
# commit group, a group in flight while the next is issued (the way CUTLASS's mainloop runs them).
_WGMMA_N = 256
_WGMMA_HEAD = r"""
typedef unsigned int u32;
typedef unsigned long long u64;
// A shared-memory matrix descriptor without swizzle (address, leading and stride byte offsets, each >> 4): the
// rate kernels multiply whatever the tile holds, so the offsets need only stay inside it.
__device__ __forceinline__ u64 smem_desc(const void* p) {
    const u64 address = (static_cast<u64>(__cvta_generic_to_shared(p)) & 0x3FFFF) >> 4;
    return address | (8ull << 16) | (16ull << 32);
}
"""
_WGMMA_KERNEL = r"""
extern "C" __global__ void __launch_bounds__(256, 1) NAME(float* out, int iters) {
    __shared__ __align__(1024) unsigned short tile[16384];
    for (int i = threadIdx.x; i < 16384; i += blockDim.x) tile[i] = 0x3F00u | ((i * 37u) & 0xFFu);  // 0.5 to 1
    __syncthreads();
    const u64 a_desc = smem_desc(tile), b_desc = smem_desc(tile + 4096);
    const u32 a0 = 0x3F403F20u ^ threadIdx.x, a1 = a0 ^ 5u, a2 = a0 ^ 9u, a3 = a0 ^ 3u, e = 0x44444444u;
    float d[ACC] = {};
    for (int i = 0; i < iters; ++i) {
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        _Pragma("unroll") for (int j = 0; j < 4; ++j) asm volatile(INSTRUCTION : OUTPUTS : INPUTS);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    float s = 0.f;
    for (int k = 0; k < ACC; ++k) s += d[k];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""
# name: (sparse, A from registers); dense-equivalent flops per instruction: 2 * 64 * N * (32 sparse, 16 dense)
_WGMMA_KERNELS = {"wgmma_dense_ss": (False, False), "wgmma_dense_rs": (False, True),
                  "wgmma_sparse_ss": (True, False), "wgmma_sparse_rs": (True, True)}


def wgmma_source() -> str:
    """The _WGMMA_KERNELS, each its inline-asm instruction written out (N / 2 accumulators per thread)."""
    accumulators = _WGMMA_N // 2
    outputs = ", ".join(f'"+f"(d[{k}])' for k in range(accumulators))
    source = _WGMMA_HEAD
    for name, (sparse, a_in_registers) in _WGMMA_KERNELS.items():
        slot = iter(range(accumulators, accumulators + 8))
        a = "{" + ", ".join(f"%{next(slot)}" for _ in range(4)) + "}" if a_in_registers else f"%{next(slot)}"
        b = f"%{next(slot)}"
        metadata = f"%{next(slot)}, 0, " if sparse else ""  # 2-bit positions, sparsity selector 0
        transposes = "0" if a_in_registers else "0, 0"  # A from registers has no transpose flag
        shape = f"sp.sync.aligned.m64n{_WGMMA_N}k32" if sparse else f"sync.aligned.m64n{_WGMMA_N}k16"
        instruction = (f"{{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.{shape}.f32.bf16.bf16 "
                       f"{{{', '.join(f'%{k}' for k in range(accumulators))}}}, {a}, {b}, {metadata}p, 1, 1, "
                       f"{transposes}; }}")
        inputs = ('"r"(a0), "r"(a1), "r"(a2), "r"(a3)' if a_in_registers else '"l"(a_desc)') + ', "l"(b_desc)'
        inputs += ', "r"(e)' if sparse else ""
        source += (_WGMMA_KERNEL.replace("NAME", name).replace("ACC", str(accumulators))
                   .replace("INSTRUCTION", f'"{instruction}"').replace("OUTPUTS", outputs).replace("INPUTS", inputs))
    return source


def instruction_rates(iters: int = 4096) -> dict[str, float]:
    """Dense-equivalent TFLOPS of each _RATE_KERNELS instruction, 8 warps per CTA, 8 CTAs per SM."""
    from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

    import hybrid_kernels as hk  # the GPU part only: the CPU tests load this file without benchmarks/ on the path

    major, minor = torch.cuda.get_device_capability()
    binary, _ = _nvrtc_compile(_RATE_SOURCE, "mma_dense", f"{major}{minor}", nvcc_options=["-std=c++17"])
    kernels = _cuda_load_module(binary, list(_RATE_KERNELS))
    ctas = 8 * torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(ctas * 256, device="cuda")
    rates = {}
    for name, flops in _RATE_KERNELS.items():
        us, _ = hk.measure_us([lambda k=kernels[name]: k(grid=(ctas, 1, 1), block=(256, 1, 1), args=[out, iters])],
                              "cuda", inner=1, reps=7)
        rates[name] = ctas * 8 * iters * 8 * flops / (us * 1e-6) / 1e12
    if (major, minor) == (9, 0):
        binary, _ = _nvrtc_compile(wgmma_source(), "wgmma_dense_ss", "90a", nvcc_options=["-std=c++17"])
        kernels = _cuda_load_module(binary, list(_WGMMA_KERNELS))
        ctas = torch.cuda.get_device_properties(0).multi_processor_count
        for name, (sparse, _) in _WGMMA_KERNELS.items():
            us, _ = hk.measure_us([lambda k=kernels[name]: k(grid=(ctas, 1, 1), block=(256, 1, 1),
                                                               args=[out, iters])], "cuda", inner=1, reps=7)
            flops = 2 * 64 * _WGMMA_N * (32 if sparse else 16)
            rates[name] = ctas * 2 * iters * 4 * flops / (us * 1e-6) / 1e12
    return rates


def gemm_rates(tokens: int) -> None:
    """cuBLAS and the op's prefill per shape (weights rotated as benchmarks/hybrid_kernels.py does); the
    per-block bound per mix from the instruction rates."""
    import hybrid_kernels as hk

    from tierprune.kernels.hybrid import pack_hybrid
    from tierprune.kernels.tiers import DENSE
    from tierprune.kernels.triton.hybrid_mm import hybrid_mm

    rates = instruction_rates()
    print(f"{torch.cuda.get_device_name()}: " + ", ".join(f"{k} {v:.0f} TFLOPS" for k, v in rates.items()))
    g = torch.Generator().manual_seed(0)
    for name, shape in hk.SHAPES.items():  # the LLaMA-2-7B shapes
        x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16)
        tier_map = hk.make_tier_map(shape, hk.MIXES["35/45/20"], "random", g)
        W = hk.pruned_weight(shape, tier_map, "cuda", seed=0)
        copies = hk.copies_needed(W.numel() * W.element_size(), "cuda")
        weights = [W.clone() for _ in range(copies)]
        packed = [pack_hybrid(w, tier_map.cuda()) for w in weights]
        flops = 2 * tokens * shape[0] * shape[1]
        cublas_us, _ = hk.measure_us([lambda w=w: F.linear(x, w) for w in weights], "cuda", inner=5, reps=7)
        op_us, _ = hk.measure_us([lambda hw=hw: hybrid_mm(x, hw) for hw in packed], "cuda", inner=5, reps=7)
        cublas = flops / (cublas_us * 1e-6) / 1e12
        bounds = []
        for mix_name, (dense, nm, topk) in BOUND_MIXES.items():
            per_block = 1 / (dense / rates["mma_dense"] + (nm + topk) / rates["mma_sparse_k32"])
            bounds.append(f"{mix_name} {per_block / cublas:.2f}x")
        tiles = ""
        if "wgmma_sparse_ss" in rates:
            dense_blocks = (tier_map == DENSE).numpy()
            paired = sparse_pair_fraction(dense_blocks, grouped_rows(dense_blocks))
            for kind in ("ss", "rs"):
                bound = 1 / ((1 - paired) / rates[f"wgmma_dense_{kind}"] + paired / rates[f"wgmma_sparse_{kind}"])
                tiles += f"; 64-row wgmma.sp tiles ({kind}, {paired:.2f} of the blocks paired) {bound / cublas:.2f}x"
        print(f"{name}, {tokens} tokens: cuBLAS {cublas:.0f} TFLOPS; the op at 35/45/20 {cublas_us / op_us:.2f}x "
              f"cuBLAS; per-block mma bound " + ", ".join(bounds) + tiles)
        del weights, packed


# ---------------------------------------------------------------- tier maps


def _work_left(columns: int | np.ndarray, sparse: int | np.ndarray) -> int | np.ndarray:
    """Dense-block steps for `columns` blocks of which `sparse` run two by two at half cost (a lone one: a whole
    step, as m16n8k16 sparse is no faster than dense)."""
    return columns - sparse // 2


def per_block_work(sparse: np.ndarray) -> float:
    """Tensor work left (1 = dense) when each block-row pairs its own sparse blocks (any two columns)."""
    return float(_work_left(sparse.shape[1], sparse.sum(1)).sum() / sparse.size)


def grouped_rows(dense: np.ndarray, group: int = 4) -> list[np.ndarray]:
    """Block-rows grouped by their dense columns as the wgmma prefill kernel's plan groups them
    (kernels/cuda/wgmma_prefill.py's grouped_block_rows), one array of block-rows per group."""
    from tierprune.kernels.cuda.wgmma_prefill import grouped_block_rows

    order = grouped_block_rows(torch.from_numpy(dense), group).view(-1, group).numpy()
    return [rows[rows >= 0] for rows in order]


def tile_work(dense: np.ndarray, groups: list[np.ndarray]) -> float:
    """Tensor work left with 64-row tiles: per group of block-rows, a column with any dense block runs dense, the
    columns without one pair up."""
    work = sum(_work_left(dense.shape[1], int((~dense[rows].any(0)).sum())) * len(rows) for rows in groups)
    return work / dense.size


def sparse_pair_fraction(dense: np.ndarray, groups: list[np.ndarray]) -> float:
    """The share of blocks that 64-row tiles run sparse, two columns at a time: 2 * (1 - tile_work)."""
    return 2 * (1 - tile_work(dense, groups))


def tier_map_report(path: str) -> None:
    import pandas as pd

    from tierprune.kernels.tiers import DENSE, NM_2_4, TOPK
    from tierprune.tasks.tier_tables import tier_maps_from_table

    maps = tier_maps_from_table(pd.read_parquet(path))
    print(f"{'matrix':<40} {'blocks':>7} {'dense':>6} {'per-block':>9} {'64-row':>7} {'grouped':>8}")
    blocks, work, tiers = 0, np.zeros(3), np.zeros(3)  # work: block-weighted sums of the three columns
    for name, tier_map in maps.items():
        tiers += np.bincount(tier_map.flatten().long().numpy(), minlength=3)[[DENSE, NM_2_4, TOPK]]
        dense = (tier_map == DENSE).numpy()
        in_order = [np.arange(i, min(i + 4, len(dense))) for i in range(0, len(dense), 4)]
        row = np.array([per_block_work(~dense), tile_work(dense, in_order), tile_work(dense, grouped_rows(dense))])
        blocks, work = blocks + dense.size, work + row * dense.size
        print(f"{name:<40} {dense.size:>7} {dense.mean():>6.2f} {row[0]:>9.3f} {row[1]:>7.3f} {row[2]:>8.3f}")
    print(f"{'all (tensor work left, 1 = dense)':<40} {blocks:>7} {tiers[0] / blocks:>6.2f} "
          f"{work[0] / blocks:>9.3f} {work[1] / blocks:>7.3f} {work[2] / blocks:>8.3f}")
    print("blocks Dense / 2:4 / TopK: " + " / ".join(f"{100 * n / blocks:.1f}%" for n in tiers))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--tier-table", help="a run's tiers.parquet: report its tier maps (CPU)")
    args = parser.parse_args(argv)
    if args.tier_table:
        tier_map_report(args.tier_table)
    elif torch.cuda.is_available():
        gemm_rates(args.tokens)
    else:
        parser.error("no GPU: give --tier-table for the CPU part")


if __name__ == "__main__":
    main()
