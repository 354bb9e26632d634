// Shared by the prefill kernels (wgmma_prefill.py prepends it to each after its #defines and convert.cuh):
// the packed format's tier codes, x's layout in shared memory and its copies, and the 2:4 helpers.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define TOKENS 256                 // per CTA: wgmma's N
#define STEP_BYTES (TOKENS * 64)   // one step of x in shared memory: 32 columns of TOKENS tokens
#define TIER_SHIFT 28
#define TIER_DENSE 0
#define TIER_NM 1
#define TIER_TOPK 2
#define TIER_NONE 3                // a padding block-row of the last group: zeros
#define FULL 0xffffffffu

#if HALF_T
#define WGMMA_TYPES ".f32.f16.f16"
#else
#define WGMMA_TYPES ".f32.bf16.bf16"
#endif

// A K-major, unswizzled wgmma operand in shared memory: core matrices of 8 rows x 8 columns (16 bytes a row, 128
// contiguous bytes), `leading` bytes apart along k and `stride` bytes apart along the rows.
__device__ __forceinline__ u64 smem_descriptor(u32 shared_address, u32 leading, u32 stride) {
    return static_cast<u64>((shared_address & 0x3FFFF) >> 4) | static_cast<u64>(leading >> 4) << 16 |
           static_cast<u64>(stride >> 4) << 32;
}

// x in shared memory: columns 8c..8c+7 of token n sit at c * TOKENS * 16 + n * 16 within a step, so core matrices
// are TOKENS * 16 bytes apart along k (the leading byte offset) and 128 along the tokens (the stride byte offset;
// the other way round faulted on an H100, session 33).
__device__ __forceinline__ u64 x_descriptor(u32 shared_address) {
    return smem_descriptor(shared_address, TOKENS * 16, 128);
}

// The half-word of a 2:4 pair at position p of its group (nibble: pos0 | pos1 << 2), or zero.
__device__ __forceinline__ u32 nm_value_at(u32 pair, u32 nibble, u32 p) {
    return (nibble & 3u) == p ? pair & 0xffffu : (nibble >> 2) == p ? pair >> 16 : 0u;
}

// One row's group of 4 in a sparse A fragment: two values at ascending positions (zeros at 0, 1 if empty).
struct Cell {
    u32 v0 = 0u, v1 = 0u, p0 = 0u, p1 = 1u, n = 0u;
    __device__ __forceinline__ void add(bool here, u32 value, u32 position) {
        if (here && n == 0u) v0 = value, p0 = position;
        if (here && n == 1u) v1 = value, p1 = position;
        n += here ? 1u : 0u;
    }
    __device__ __forceinline__ void finish() {
        if (n == 1u) {  // one entry: paired with a zero at another position
            if (p0 == 3u) v1 = v0, v0 = 0u, p1 = 3u, p0 = 2u;
            else v1 = 0u, p1 = 3u;
        } else if (n == 2u && p0 > p1) {
            const u32 v = v0, p = p0;
            v0 = v1, p0 = p1, v1 = v, p1 = p;
        }
    }
    __device__ __forceinline__ u32 pair() const { return v0 | v1 << 16; }
    __device__ __forceinline__ u32 nibble() const { return p0 | p1 << 2; }
};

// A warp's 16 rows of y (T, R) from its accumulators after the K loop: d[4j + i] is row g (i < 2) or g+8 of
// block-row `block_row` (-1: a padding member, nothing to store), token token0 + 8j + 2t + (i & 1).
__device__ __forceinline__ void store_rows(u16* __restrict__ y, const float* d, int block_row, int token0, int lane,
                                           int T, int R) {
    const int g = lane >> 2, t = lane & 3;
    if (block_row < 0) return;
#pragma unroll
    for (int j = 0; j < TOKENS / 8; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int token = token0 + 8 * j + 2 * t + (i & 1), row = block_row * 16 + g + 8 * (i >> 1);
            if (token < T && row < R) y[(size_t)token * R + row] = from_float(d[4 * j + i]);
        }
    }
}

// What only the GPU has (a CPU test defines its own: tests/kernels/wgmma_on_cpu.cpp).
#ifdef __CUDA_ARCH__

// Through L1 (.ca, not .cg): a token's 64 bytes of a step are half of a 128-byte line whose other half the next
// step reads; kept in L1, the second half costs no trip to L2 (+9-17% at 2048 tokens on an H100, sessions 34, 36).
__device__ __forceinline__ void cp_async_16(u32 shared_address, const void* global, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(shared_address), "l"(global), "r"(valid ? 16 : 0) : "memory");
}

// Weights are read once per CTA: through L2 only.
__device__ __forceinline__ void cp_async_16_l2(u32 shared_address, const void* global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(shared_address), "l"(global) : "memory");
}

__device__ __forceinline__ void st_shared_v4(u32 address, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" :: "r"(address), "r"(a), "r"(b), "r"(c), "r"(d)
                 : "memory");
}

__device__ __forceinline__ void st_shared_v2(u32 address, u32 a, u32 b) {
    asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" :: "r"(address), "r"(a), "r"(b) : "memory");
}

__device__ __forceinline__ void st_shared_u32(u32 address, u32 a) {
    asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(address), "r"(a) : "memory");
}

__device__ __forceinline__ void st_shared_u16(u32 address, u32 a) {
    asm volatile("st.shared.u16 [%0], %1;\n" :: "r"(address), "h"(static_cast<u16>(a)) : "memory");
}

__device__ __forceinline__ void st_shared_u8(u32 address, u32 a) {
    asm volatile("st.shared.u8 [%0], %1;\n" :: "r"(address), "r"(a) : "memory");
}

__device__ __forceinline__ u32 ld_shared_u32(u32 address) {
    u32 a;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(a) : "r"(address) : "memory");
    return a;
}

__device__ __forceinline__ u32 ld_shared_u8(u32 address) {
    u32 a;
    asm volatile("ld.shared.u8 %0, [%1];\n" : "=r"(a) : "r"(address) : "memory");
    return a;
}

// wgmma's bookkeeping: the fence before a warpgroup's wgmmas read registers, the commit of those issued, and the
// wait until at most `pending` committed groups are still running.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int pending>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(pending) : "memory");
}

// cp.async's bookkeeping: the copies issued so far made a group; the wait until at most `pending` groups are
// still copying; the wait until none is.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(pending) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

#endif  // __CUDA_ARCH__
