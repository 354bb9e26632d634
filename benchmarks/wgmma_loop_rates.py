"""Whether the shape of a wgmma loop costs rate: dense `wgmma m64n256k16` with A from registers, two warpgroups per
CTA, one CTA per SM, in loops shaped like kernels/cuda/wgmma_prefill.cu's and like prefill_ceiling.py's rate kernel.

Each variant changes one thing: instructions per commit group (1, 2, 4, 8; the prefill kernel commits 1 or 2),
groups left in flight (wait_group 1 or 0), x's shared-memory layout (compact core matrices, or the prefill kernel's:
k-direction offset 4096 bytes, token-direction 128) and buffers rotated per step, A's registers rewritten every step
(two alternating sets, as the prefill kernel builds its fragments), and a `__syncthreads` per step. Prints dense
TFLOPS per variant. Session 34 (H100): 963-979 TFLOPS for every variant, so none of these is what holds the
prefill kernel's bare loop to 0.5-0.6x cuBLAS (docs/kernels.md).

Run (an H100 or H200):
    python benchmarks/wgmma_loop_rates.py
"""
from __future__ import annotations

import argparse

import torch

_HEAD = r"""
typedef unsigned int u32;
typedef unsigned long long u64;
__device__ __forceinline__ u64 descriptor(u32 address, u64 leading, u64 stride) {
    return static_cast<u64>((address & 0x3FFFF) >> 4) | (leading >> 4) << 16 | (stride >> 4) << 32;
}
"""
_KERNEL = r"""
extern "C" __global__ void __launch_bounds__(256, 1) NAME(float* out, int iters) {
    extern __shared__ __align__(128) unsigned short tile[];
    for (int i = threadIdx.x; i < 32768; i += blockDim.x) tile[i] = 0x3F00u | ((i * 37u) & 0xFFu);  // 0.5 to 1
    __syncthreads();
    const u32 base = static_cast<u32>(__cvta_generic_to_shared(tile));
    u32 a0[4], a1[4];
    for (int q = 0; q < 4; ++q) a0[q] = 0x3F403F20u ^ (threadIdx.x + q), a1[q] = a0[q] ^ 1u;
    float d[128];
    _Pragma("unroll") for (int k = 0; k < 128; ++k) d[k] = 0.f;
    auto step = [&](int i, u32 (&a)[4]) {
        const u32 buffer = base + (ROTATE ? (i & 3) * 16384 : 0);
        if (REWRITE) { _Pragma("unroll") for (int q = 0; q < 4; ++q) a[q] ^= (i << 3); }
        if (BARRIER) __syncthreads();
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
        _Pragma("unroll") for (int j = 0; j < PER_GROUP; ++j) {
            const u64 b = descriptor(buffer + (j & 1) * 2 * LEADING, LEADING, STRIDE);
            asm volatile(INSTRUCTION : OUTPUTS : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
        }
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned IN_FLIGHT;" ::: "memory");
    };
    for (int i = 0; i < iters; i += 2) { step(i, a0); step(i + 1, a1); }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    float s = 0.f;
    for (int k = 0; k < 128; ++k) s += d[k];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""
# name: (instructions per commit group, groups left in flight, prefill kernel's layout and rotated buffers,
# A rewritten per step, __syncthreads per step)
VARIANTS = {
    "4 per group (the rate kernel)": (4, 1, False, False, False),
    "2 per group": (2, 1, False, False, False),
    "1 per group": (1, 1, False, False, False),
    "2 per group, none in flight": (2, 0, False, False, False),
    "2 per group, prefill layout, rotated": (2, 1, True, False, False),
    "2 per group, + A rewritten": (2, 1, True, True, False),
    "2 per group, + A rewritten, + barrier": (2, 1, True, True, True),
    "4 per group, + A rewritten, + barrier": (4, 1, True, True, True),
    "8 per group, + A rewritten, + barrier": (8, 1, True, True, True),
}
SHARED_BYTES = 65536


def kernel_name(index: int) -> str:
    return f"loop_{index}"


def source() -> str:
    """Every VARIANTS kernel (loop_0, loop_1, ...), its wgmma's 128 accumulators written out."""
    outputs = ", ".join(f'"+f"(d[{k}])' for k in range(128))
    instruction = ('"{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {'
                   + ", ".join(f"%{k}" for k in range(128)) + '}, {%128, %129, %130, %131}, %132, p, 1, 1, 0; }"')
    text = _HEAD
    for index, (per_group, in_flight, prefill_layout, rewrite, barrier) in enumerate(VARIANTS.values()):
        leading, stride = (4096, 128) if prefill_layout else (128, 256)
        kernel = _KERNEL
        for key, value in dict(NAME=kernel_name(index), PER_GROUP=per_group, IN_FLIGHT=in_flight,
                               ROTATE=int(prefill_layout), REWRITE=int(rewrite), BARRIER=int(barrier),
                               LEADING=leading, STRIDE=stride, INSTRUCTION=instruction, OUTPUTS=outputs).items():
            kernel = kernel.replace(key, str(value))
        text += kernel
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instructions", type=int, default=8192, help="wgmma per warpgroup per variant")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        parser.error("needs an sm_90 GPU (H100 / H200)")
    from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

    import hybrid_kernels as hk

    names = [kernel_name(i) for i in range(len(VARIANTS))]
    binary, _ = _nvrtc_compile(source(), names[0], "90a", nvcc_options=["-std=c++17"])
    kernels = _cuda_load_module(binary, names)
    ctas = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(ctas * 256, device="cuda")
    print(torch.cuda.get_device_name())
    for name, (per_group, *_), kernel_id in zip(VARIANTS, VARIANTS.values(), names):
        kernel = kernels[kernel_id]
        kernel.set_shared_memory_config(SHARED_BYTES)
        iters = args.instructions // per_group
        us, _ = hk.measure_us([lambda k=kernel: k(grid=(ctas, 1, 1), block=(256, 1, 1), args=[out, iters],
                                                  shared_mem=SHARED_BYTES)], "cuda", inner=1, reps=7)
        flops = ctas * 2 * iters * per_group * 2 * 64 * 256 * 16
        print(f"{name:<40} {flops / (us * 1e-6) / 1e12:6.0f} TFLOPS")


if __name__ == "__main__":
    main()
