// Prefill (many tokens) through a packed hybrid weight on Hopper's warpgroup tensor cores (sm_90a).
//
// y (T, R) = x (T, K) @ W.T with W read from its packed blocks. A warpgroup (4 warps) computes 64 weight rows, a
// group of 4 block-rows (any 4: the plan may group block-rows whose dense blocks share columns), for 256 tokens:
// wgmma's A operand is the weight, taken from registers, and warp w of the warpgroup holds exactly block-row w
// of the group, so each warp builds its own A fragment from its own packed blocks. B is x, staged in shared
// memory by cp.async. K runs in steps of 32 (two block columns). The plan marks each (group, step) sparse when
// all 8 blocks of the group there are 2:4, or TopK with at most 2 nonzero entries in every group of 4 columns:
// then one wgmma.sp m64n256k32 does the step (1.8-1.9x dense wgmma's rate on an H100), each warp's two blocks
// becoming the sparse A (their kept pairs) and its metadata (their 2-bit positions). Any other step runs as two
// dense wgmma m64n256k16, each block expanded to a dense fragment (2:4 pairs placed at their positions, TopK
// entries scattered).
//
// A CTA is two warpgroups (two groups of block-rows) sharing the x tile; x runs through STAGES shared-memory
// buffers, two steps ahead. Each warp loads its next step's blocks while the current step's wgmma runs.
//
// Compile-time constants (prepended by wgmma_prefill.py): HALF_T (0 bf16, 1 fp16), TOPK, OVERLAP (one step's
// wgmma left in flight while the next is prepared), and the wgmma operand lists WGMMA_D (the accumulators in the
// asm string) and WGMMA_D_OPERANDS (their constraints).
//
// Speed (H100, sessions 33 and 36, docs/kernels.md): correct, but 0.18-0.30x cuBLAS at 2048 tokens (0.20-0.29x on
// 4096x4096 with x through L1), slower than unpack + cuBLAS (0.72-0.80x), so the op does not use it unless asked
// (wgmma_prefill.use_wgmma_prefill). Profiled (session 36): each step waits on the slowest warp's fragment at the
// warpgroup's wgmma.fence and on weight loads issued only a step ahead; with neither, the loop's tiling itself
// stops at 0.85-0.91x cuBLAS.

#if OVERLAP
#define STAGES 4                   // steps s-1 (its wgmma in flight), s, and s+1, s+2 arriving
#else
#define STAGES 3
#endif

// A from this warp's registers (its 16 rows of the 64). The GPU's; a CPU test defines its own.
#ifdef __CUDA_ARCH__
__device__ __forceinline__ void wgmma_dense(float* d, const u32* a, u64 b) {
    asm volatile("{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.sync.aligned.m64n256k16" WGMMA_TYPES " "
                 WGMMA_D ", {%128, %129, %130, %131}, %132, p, 1, 1, 0; }"
                 : WGMMA_D_OPERANDS : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

__device__ __forceinline__ void wgmma_sparse(float* d, const u32* a, u64 b, u32 e) {
    asm volatile("{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.sp.sync.aligned.m64n256k32" WGMMA_TYPES " "
                 WGMMA_D ", {%128, %129, %130, %131}, %132, %133, 0, p, 1, 1, 0; }"
                 : WGMMA_D_OPERANDS : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(e));
}
#endif  // __CUDA_ARCH__

// One step (32 columns from k0) of TOKENS tokens from token0 into the buffer at `buffer`: 1024 16-byte pieces,
// 4 per thread; tokens past T are zero-filled.
__device__ __forceinline__ void load_x_step(u32 buffer, const u16* __restrict__ x, int token0, int k0, int T, int K) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int piece = threadIdx.x + i * 256, token = piece % TOKENS, chunk = piece / TOKENS;
        const bool valid = token0 + token < T;
        const u16* src = x + (size_t)(valid ? token0 + token : 0) * K + k0 + chunk * 8;
        cp_async_16(buffer + chunk * TOKENS * 16 + token * 16, src, valid);
    }
    cp_async_commit();
}

// What a warp holds of one block between its loads and its fragment: up to 4 words of values, 2 of metadata
// (rows g and g+8), or this lane's TopK entry (value | position << 16; lanes >= TOPK hold none).
struct RawBlock {
    u32 tier, w[4], meta[2], entry;
};

// The block's words this lane needs: in a sparse step, a 2:4 block's kept pairs of group t in rows g and g+8;
// in a dense step, the pairs of groups t/2 and t/2 + 2 (the groups of columns 2t, 2t+1 and 2t+8, 2t+9), or a
// dense block's words at those columns. Loads only: the fragment is built a step later.
__device__ __forceinline__ void load_block(RawBlock& raw, u32 slot, bool sparse_step,
                                           const u32* __restrict__ dense_words, const u32* __restrict__ nm_pairs,
                                           const u16* __restrict__ nm_meta, const u16* __restrict__ topk_values,
                                           const unsigned char* __restrict__ topk_pos, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const u32 index = slot & ((1u << TIER_SHIFT) - 1);
    raw.tier = slot >> TIER_SHIFT;
    if (raw.tier == TIER_DENSE) {
        const u32* v = dense_words + (size_t)index * 128;  // 16 rows of 8 words
        raw.w[0] = __ldg(v + g * 8 + t), raw.w[1] = __ldg(v + (g + 8) * 8 + t);
        raw.w[2] = __ldg(v + g * 8 + t + 4), raw.w[3] = __ldg(v + (g + 8) * 8 + t + 4);
    } else if (raw.tier == TIER_NM) {
        const u32* v = nm_pairs + (size_t)index * 64;  // 16 rows of 4 pairs
        if (sparse_step) {
            raw.w[0] = __ldg(v + g * 4 + t), raw.w[1] = __ldg(v + (g + 8) * 4 + t);
        } else {
            raw.w[0] = __ldg(v + g * 4 + (t >> 1)), raw.w[1] = __ldg(v + (g + 8) * 4 + (t >> 1));
            raw.w[2] = __ldg(v + g * 4 + (t >> 1) + 2), raw.w[3] = __ldg(v + (g + 8) * 4 + (t >> 1) + 2);
        }
        const u16* meta = nm_meta + (size_t)index * 16;
        raw.meta[0] = __ldg(meta + g), raw.meta[1] = __ldg(meta + g + 8);
    } else if (raw.tier == TIER_TOPK) {
        raw.entry = lane < TOPK ? static_cast<u32>(__ldg(topk_values + (size_t)index * TOPK + lane)) |
                                      static_cast<u32>(__ldg(topk_pos + (size_t)index * TOPK + lane)) << 16
                                : 0u;  // never read: the entries are shuffled from lanes below TOPK
    }
}

// Dense fragment (wgmma k16 A, this warp's 16 rows): a[0] row g cols 2t,2t+1; a[1] row g+8; a[2] row g cols
// 2t+8,2t+9; a[3] row g+8.
__device__ __forceinline__ void dense_fragment(u32* a, const RawBlock& raw, int lane) {
    const int g = lane >> 2, t = lane & 3;
    if (raw.tier == TIER_DENSE) {
        a[0] = raw.w[0], a[1] = raw.w[1], a[2] = raw.w[2], a[3] = raw.w[3];
    } else if (raw.tier == TIER_NM) {
        const u32 p = 2u * (t & 1);  // columns 2t, 2t+1 are positions p, p+1 of group t/2 (and t/2 + 2)
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // i: 0 row g group t/2, 1 row g+8, 2 row g group t/2+2, 3 row g+8
            const u32 nibble = (raw.meta[i & 1] >> (4 * ((t >> 1) + (i >> 1) * 2))) & 15u;
            a[i] = nm_value_at(raw.w[i], nibble, p) | nm_value_at(raw.w[i], nibble, p + 1) << 16;
        }
    } else {
        a[0] = a[1] = a[2] = a[3] = 0u;
        if (raw.tier == TIER_TOPK) {
#pragma unroll
            for (int j = 0; j < TOPK; ++j) {
                const u32 entry = __shfl_sync(FULL, raw.entry, j);
                const u32 r = entry >> 20, c = (entry >> 16) & 15u;
                const u32 value = (c & 1u) ? entry << 16 : entry & 0xffffu;  // its half of the word
                const bool mine = (r & 7u) == g && (c & 7u) >> 1 == t;  // one of this lane's 8 slots
                const u32 slot = (r >> 3) + 2 * (c >> 3);
#pragma unroll
                for (int i = 0; i < 4; ++i) a[i] |= mine && slot == i ? value : 0u;
            }
        }
    }
}

// The four nibbles of a row (group t's from lane t of the quad), in every lane of the quad.
__device__ __forceinline__ u32 quad_nibbles(u32 nibble, int t) {
    u32 nibbles = nibble << (4 * t);
    nibbles |= __shfl_xor_sync(FULL, nibbles, 1);
    return nibbles | __shfl_xor_sync(FULL, nibbles, 2);
}

// Sparse fragment of one block (its half of wgmma.sp k32's A): lo / hi the kept pair of group t in rows g / g+8;
// meta[0] / meta[1] rows g / g+8's four nibbles (all four groups, the same in the quad's lanes).
__device__ __forceinline__ void sparse_fragment(u32& lo, u32& hi, u32* meta, const RawBlock& raw, int lane) {
    const int g = lane >> 2, t = lane & 3;
    if (raw.tier == TIER_NM) {
        lo = raw.w[0], hi = raw.w[1], meta[0] = raw.meta[0], meta[1] = raw.meta[1];
        return;
    }
    // TopK (at most 2 nonzero entries per group of 4, the plan checked) or none: this lane's cells, rows g and g+8 of
    // group t, from the entries.
    Cell upper, lower;
    if (raw.tier == TIER_TOPK) {
#pragma unroll
        for (int j = 0; j < TOPK; ++j) {
            const u32 entry = __shfl_sync(FULL, raw.entry, j);
            const u32 r = entry >> 20, c = (entry >> 16) & 15u;
            const bool mine = (r & 7u) == g && (c >> 2) == t && (entry & 0x7fffu) != 0u;  // zeros take no slot
            upper.add(mine && r < 8u, entry & 0xffffu, c & 3u);
            lower.add(mine && r >= 8u, entry & 0xffffu, c & 3u);
        }
        upper.finish(), lower.finish();
    }
    lo = upper.pair(), hi = lower.pair();
    meta[0] = quad_nibbles(upper.nibble(), t), meta[1] = quad_nibbles(lower.nibble(), t);
}

// wgmma.sp's metadata word of this lane (sparsity selector 0: lanes t = 0, 1 of each quad supply it): lane t holds
// block t's rows g (low half) and g+8 (high half), two k16 metadata words side by side. (Row g's 32 columns in
// lane 0 and row g+8's in lane 1 gave wrong products on an H100, session 33.)
__device__ __forceinline__ u32 sparse_metadata(const u32* meta0, const u32* meta1, int t) {
    return t == 0 ? (meta0[0] | meta0[1] << 16) : (meta1[0] | meta1[1] << 16);
}

extern "C" __global__ void __launch_bounds__(256, 1)
hybrid_wgmma_prefill(const u16* __restrict__ x, u16* __restrict__ y,
                     const u32* __restrict__ dense_words,       // (nd, 16, 8) words: dense blocks, row-major
                     const u32* __restrict__ nm_pairs,          // (nn, 16, 4) words: 2:4 kept pairs
                     const u16* __restrict__ nm_meta,           // (nn, 16): a row's four nibbles
                     const u16* __restrict__ topk_values,       // (nt, TOPK)
                     const unsigned char* __restrict__ topk_pos,  // (nt, TOPK), row-major position in the block
                     const u32* __restrict__ slots,             // (groups * 4, K / 16): tier << 28 | index
                     const unsigned char* __restrict__ sparse_steps,  // (groups, K / 32): 1 = one wgmma.sp
                     const int* __restrict__ group_rows,        // (groups * 4): block-row of each warp, -1 none
                     int T, int K, int R) {
    extern __shared__ __align__(128) unsigned char shared[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int group = blockIdx.y * 2 + (warp >> 2), member = group * 4 + (warp & 3);
    const int token0 = blockIdx.x * TOKENS, steps = K / 32, block_cols = K / 16;
    const u32 buffers = static_cast<u32>(__cvta_generic_to_shared(shared));
    const u32* my_slots = slots + (size_t)member * block_cols;
    const unsigned char* my_steps = sparse_steps + (size_t)group * steps;

    float d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.f;

    load_x_step(buffers, x, token0, 0, T, K);
    if (steps > 1) load_x_step(buffers + STEP_BYTES, x, token0, 32, T, K);
    RawBlock raw[2];
    bool sparse = my_steps[0];
    load_block(raw[0], my_slots[0], sparse, dense_words, nm_pairs, nm_meta, topk_values, topk_pos, lane);
    load_block(raw[1], my_slots[1], sparse, dense_words, nm_pairs, nm_meta, topk_values, topk_pos, lane);
    // The next step's slots and kind, a step ahead of its block loads (which wait on them).
    uint2 next_slots = steps > 1 ? *reinterpret_cast<const uint2*>(my_slots + 2) : make_uint2(0u, 0u);
    bool next_sparse = steps > 1 ? my_steps[1] : false;

    // One step: x of step s has landed (one later step may still be in flight), and after the barrier every
    // warpgroup is past the wait that frees the buffer that step s+2 goes to. `a` is this step's A operand (and
    // metadata word, a[8]): registers a wgmma in flight still reads, so where one stays in flight (OVERLAP) the
    // steps alternate between two sets.
    auto step = [&](int s, u32 (&a)[9]) {
        if (s + 1 < steps) cp_async_wait<1>();
        else cp_async_wait<0>();
        __syncthreads();
        if (s + 2 < steps) load_x_step(buffers + ((s + 2) % STAGES) * STEP_BYTES, x, token0, (s + 2) * 32, T, K);

        // This step's fragments from the raw words loaded a step ago; then the next step's loads.
        if (sparse) {
            u32 meta0[2], meta1[2];
            sparse_fragment(a[0], a[1], meta0, raw[0], lane);
            sparse_fragment(a[2], a[3], meta1, raw[1], lane);
            a[8] = sparse_metadata(meta0, meta1, t);
        } else {
            dense_fragment(a, raw[0], lane);
            dense_fragment(a + 4, raw[1], lane);
        }
        const bool was_sparse = __shfl_sync(FULL, static_cast<int>(sparse), 0);  // the same in the warpgroup
        if (s + 1 < steps) {
            sparse = next_sparse;
            load_block(raw[0], next_slots.x, sparse, dense_words, nm_pairs, nm_meta, topk_values, topk_pos, lane);
            load_block(raw[1], next_slots.y, sparse, dense_words, nm_pairs, nm_meta, topk_values, topk_pos, lane);
            if (s + 2 < steps) {
                next_slots = *reinterpret_cast<const uint2*>(my_slots + 2 * s + 4);
                next_sparse = my_steps[s + 2];
            }
        }
        const u32 step_buffer = buffers + (s % STAGES) * STEP_BYTES;
        wgmma_fence();
        if (was_sparse) {
            wgmma_sparse(d, a, x_descriptor(step_buffer), a[8]);
        } else {
            wgmma_dense(d, a, x_descriptor(step_buffer));
            wgmma_dense(d, a + 4, x_descriptor(step_buffer + 2 * TOKENS * 16));  // columns 16-31: chunks 2, 3
        }
        wgmma_commit();
#if OVERLAP
        wgmma_wait<1>();  // step s-1's wgmma is done
#else
        wgmma_wait<0>();
#endif
    };
    u32 a_even[9], a_odd[9];
    for (int s = 0; s < steps; s += 2) {
        step(s, a_even);
        if (s + 1 < steps) step(s + 1, a_odd);
    }
    wgmma_wait<0>();

    store_rows(y, d, group_rows[member], token0, lane, T, R);
}
