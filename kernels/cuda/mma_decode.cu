// Decode (1-16 tokens) through a packed hybrid weight on the tensor cores: every 16x16 block, whatever its
// tier, becomes one mma.sync m16n8k16 A operand built in registers (a 2:4 block, where SPARSE_24, the sparse A
// operand of mma.sp as stored), with no shared-memory staging of weights.
//
// Why the tensor cores at one token: the Triton GEMV spends ~100 warp instructions per dense block (loads,
// bf16->fp32 conversions, FMAs, reductions) and is bound by instruction issue, not by bytes. Here a dense
// block is two 8-byte loads per lane and one mma; the mma's idle token columns cost nothing that matters.
//
// The trick that makes the loads direct: the sum over k does not care which physical column is which logical
// k, as long as A and B agree. Lane (g = lane/4, t = lane%4) holds, in the A fragment, logical columns
// {2t, 2t+1, 2t+8, 2t+9} of rows g and g+8; we let them be the physical columns 4t..4t+3. Then A is one
// 8-byte load per row straight from the row-major block, and B (x) one 8-byte load of x[token g][4t..4t+3].
// A 2:4 block row's group t is exactly those four columns: its two kept values (4 bytes) and their two 2-bit
// positions are spread to four slots with two byte permutes, their selectors from a 16-entry table. Or, where
// SPARSE_24, a 2:4 block goes to the sparse tensor cores as stored (mma.sp m16n8k16: the kept pairs are the
// sparse A fragment and the positions its metadata), which saves the permutes and the table's shared-memory
// loads but reads x in the mma's own k order, two 4-byte loads per token tile instead of one 8-byte load.
// TopK blocks are scattered into a zeroed per-warp tile in shared memory, read back as fragments, and the
// tile zeroed again.
//
// Work: one warp per chunk of consecutive blocks of one tier (sorted by block-row). The fp32 accumulators
// belong to one block-row; when a chunk crosses into the next block-row, and at its end, they are added into
// the fp32 workspace ws (T, NPAD) with relaxed atomics. hybrid_cast_and_zero then writes the output and
// zeroes ws. (A persistent grid, warps looping over chunks and loading the next chunk's indices ahead, was
// slower at every shape and token count timed on the H200: the loop doubled the registers.)
//
// Latency, not bandwidth, is what a warp must hide: every global load of a chunk is issued before the first
// mma. A chunk's block columns and block-rows are one load per lane (a chunk is at most 32 blocks), passed
// around with shuffles, so that the x loads wait on one round trip only; TopK entries are fetched up front.
//
// Compile-time constants (prepended as #defines by mma_decode.py): TOPK (at most 32), NTILE (8-token mma
// tiles: 1 or 2), WARPS (per CTA), CHUNK (dense and 2:4 blocks per warp), TOPK_CHUNK (TopK blocks per warp;
// both at most 32), HALF_T (0 bf16, 1 fp16), SELECTORS (the 2:4 table's initializer), X_BLOCK_MAJOR (x's layout
// for the row kernel) and SPARSE_24 (2:4 blocks on the sparse tensor cores).

typedef unsigned short u16;
typedef unsigned int u32;

// TopK blocks scattered per round by one warp: as many as 32 lanes hold, at most 4 (shared memory per warp).
#define TOPK_PER_ROUND (TOPK <= 8 ? 4 : 32 / TOPK)
#define TOPK_ROUNDS ((TOPK_CHUNK + TOPK_PER_ROUND - 1) / TOPK_PER_ROUND)
#define FULL 0xffffffffu

// The byte-permute selectors of each 2:4 nibble p0 | p1 << 2 (SELECTORS: mma_decode.selector_table()), in
// constant memory: read once per CTA into shared memory, where lanes index them freely.
__constant__ uint2 kSelectors[16] = SELECTORS;

__device__ __forceinline__ void mma_16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if HALF_T
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

#ifndef SPARSE_24
#define SPARSE_24 0
#endif

// A 2:4 block on the sparse tensor cores: a0 / a1 the kept pairs of group t in rows g / g+8, e the two rows'
// 16-bit metadata (row g in the low half; packed positions are sorted and distinct, as mma.sp requires), read
// from lane t = 0 of each quad (sparsity selector 0).
__device__ __forceinline__ void mma_sp_16816(float* c, u32 a0, u32 a1, u32 b0, u32 b1, u32 e) {
#if HALF_T
    asm volatile("mma.sp.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6,%7}, "
                 "{%0,%1,%2,%3}, %8, 0x0;\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0), "r"(b1), "r"(e));
#else
    asm volatile("mma.sp.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6,%7}, "
                 "{%0,%1,%2,%3}, %8, 0x0;\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0), "r"(b1), "r"(e));
#endif
}

// x[token][col*16 + 4t .. +3] for the NTILE token tiles (tokens g and g+8); zero for tokens >= T. BLOCK_MAJOR:
// x laid out as (K/16, NTILE*8, 16), each block column's tokens together (those >= T never read), so that a
// tile's load touches 256 contiguous bytes (two L1 lines) rather than 32 bytes in each of 8 tokens' lines.
// SPARSE (a 2:4 block on the sparse tensor cores): x[token][col*16 + 2t, +1] and [col*16 + 2t + 8, +9] instead, the
// B fragment in the mma's own k order (the sparse A's groups of 4 are the stored physical columns, so the dense
// blocks' column trick cannot apply).
template <bool BLOCK_MAJOR, bool SPARSE = false>
__device__ __forceinline__ void load_x(uint2* bx, const u16* __restrict__ x, int col, int g, int t, int T, int K) {
#pragma unroll
    for (int tile = 0; tile < NTILE; ++tile) {
        const int token = g + 8 * tile;
        if constexpr (SPARSE) {
            if (token < T) {
                const u32* w = BLOCK_MAJOR ? reinterpret_cast<const u32*>(x) + col * (NTILE * 64) + token * 8 + t
                                           : reinterpret_cast<const u32*>(x + (size_t)token * K + col * 16) + t;
                bx[tile] = make_uint2(__ldg(w), __ldg(w + 4));
            } else {
                bx[tile] = make_uint2(0u, 0u);
            }
        } else if constexpr (BLOCK_MAJOR)
            // (indexed in 8-byte words: the same address in u16s made ptxas spill in the capped configs)
            bx[tile] = token < T ? __ldg(reinterpret_cast<const uint2*>(x) + col * (NTILE * 32) + token * 4 + t)
                                 : make_uint2(0u, 0u);
        else
            bx[tile] = token < T ? __ldg(reinterpret_cast<const uint2*>(x + (size_t)token * K + col * 16 + 4 * t))
                                 : make_uint2(0u, 0u);
    }
}

#ifndef X_BLOCK_MAJOR
#define X_BLOCK_MAJOR 0
#endif

// Adds one 8-token tile's accumulators of block-row `row` into ws: c0..c3 at rows g, g, g+8, g+8 and tokens
// token, token+1, token, token+1 (the mma's C layout). Out of line: a chunk may cross block-rows at any of its
// blocks, and an inlined copy at each would multiply the kernel's size.
__device__ __noinline__ void add_tile(float* __restrict__ ws, int row, int g, int token, int T, int NPAD,
                                      float c0, float c1, float c2, float c3) {
    float* base = ws + (size_t)token * NPAD + row * 16 + g;
    if (token < T) {
        atomicAdd(base, c0);
        atomicAdd(base + 8, c2);
    }
    if (token + 1 < T) {
        atomicAdd(base + NPAD, c1);
        atomicAdd(base + NPAD + 8, c3);
    }
}

// Adds the accumulators of block-row `row` into ws and zeroes them; acc[tile] holds tokens 8·tile + 2t, +1.
__device__ __forceinline__ void flush(float (*acc)[4], float* __restrict__ ws, int row, int g, int t, int T, int NPAD) {
#pragma unroll
    for (int tile = 0; tile < NTILE; ++tile) {
        add_tile(ws, row, g, 8 * tile + 2 * t, T, NPAD, acc[tile][0], acc[tile][1], acc[tile][2], acc[tile][3]);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[tile][i] = 0.f;
    }
}

__device__ __forceinline__ void mma_tiles(float (*acc)[4], u32 a0, u32 a1, u32 a2, u32 a3, const uint2* bx) {
#pragma unroll
    for (int tile = 0; tile < NTILE; ++tile) mma_16816(acc[tile], a0, a1, a2, a3, bx[tile].x, bx[tile].y);
}

// Dense and 2:4 weights are read once: kept out of L1, they leave it to the x fragments, which every block-row
// on an SM reads again (H100, session 24: 1-6% faster at each of 80 shapes, mixes and token counts timed, 1-16
// tokens; TopK entries kept out too were slower by 0.2% at the median).
__device__ __forceinline__ uint2 ld_stream2(const uint2* p) {
    uint2 v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 ld_stream(const u32* p) {
    u32 v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ u16 ld_stream(const u16* p) {
    u16 v;
    asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

// Block i of a dense (TIER 0) or 2:4 (TIER 1) chunk: this lane's words. Dense: the A fragment itself, rows g
// and g+8 at columns 4t..4t+1 and 4t+2..4t+3. 2:4: the kept pairs of group t in rows g and g+8, then the two
// rows' metadata (four 4-bit groups each). The pointers are this lane's words of the chunk's first block, so
// that every block's address is an immediate offset.
template <int TIER>
__device__ __forceinline__ void load_block(u32* raw, const void* __restrict__ values, const u16* __restrict__ meta,
                                           int i) {
    if (TIER == 0) {
        const uint2 lo = ld_stream2(static_cast<const uint2*>(values) + i * 64);
        const uint2 hi = ld_stream2(static_cast<const uint2*>(values) + i * 64 + 32);  // row g+8
        raw[0] = lo.x, raw[1] = hi.x, raw[2] = lo.y, raw[3] = hi.y;
    } else {
        const u32* v = static_cast<const u32*>(values) + i * 64;
        raw[0] = ld_stream(v), raw[1] = ld_stream(v + 32), raw[2] = ld_stream(meta + i * 16),
        raw[3] = ld_stream(meta + i * 16 + 8);
    }
}

// The A fragment of a loaded block: a dense block's words as they are; a 2:4 block's pairs spread to their
// columns by two byte permutes each, selected by the group's nibble.
template <int TIER>
__device__ __forceinline__ void fragment(u32* a, const u32* raw, const uint2* sel, int t) {
    if (TIER == 0) {
        a[0] = raw[0], a[1] = raw[1], a[2] = raw[2], a[3] = raw[3];
    } else {
        const uint2 s_lo = sel[(raw[2] >> (4 * t)) & 15u], s_hi = sel[(raw[3] >> (4 * t)) & 15u];
        a[0] = __byte_perm(raw[0], 0u, s_lo.x), a[1] = __byte_perm(raw[1], 0u, s_hi.x);
        a[2] = __byte_perm(raw[0], 0u, s_lo.y), a[3] = __byte_perm(raw[1], 0u, s_hi.y);
    }
}

// A dense or 2:4 chunk of n <= CH blocks from `start`: all its loads (blocks, then x) issued first, then one mma per
// block and 8-token tile. Lane col_lane0 + i holds block i's column, lane i its block-row; the accumulators go to
// ws whenever the block-row changes, unless ONE_ROW (the row kernel: every block in one block-row).
template <int TIER, int CH, bool ONE_ROW>
__device__ __forceinline__ void stream_blocks(float (*acc)[4], int& row, int n, int start, int lane_col, int col_lane0,
                                              int lane_row, const void* __restrict__ values,
                                              const u16* __restrict__ meta, const u16* __restrict__ x,
                                              const uint2* sel, float* __restrict__ ws, int g, int t, int T, int K,
                                              int NPAD) {
    // A block is 64 words of this lane's width (8 bytes dense, 4 bytes 2:4) and 16 u16 of 2:4 metadata.
    constexpr int word = TIER == 0 ? sizeof(uint2) : sizeof(u32);
    const void* lane_values = static_cast<const char*>(values) + ((size_t)start * 64 + g * 4 + t) * word;
    const u16* lane_meta = TIER == 0 ? nullptr : meta + (size_t)start * 16 + g;  // dense blocks have none
    // The weights first: their addresses need no block column, so they do not wait for the column loads that
    // the x loads wait on (the first step of a tier would otherwise add one round trip).
    u32 raw[CH][4];
    uint2 bx[CH][NTILE];
#pragma unroll
    for (int i = 0; i < CH; ++i)
        if (i < n) load_block<TIER>(raw[i], lane_values, lane_meta, i);
#pragma unroll
    for (int i = 0; i < CH; ++i) {
        const int col = __shfl_sync(FULL, lane_col, col_lane0 + i);
        if (i < n) load_x<ONE_ROW && X_BLOCK_MAJOR, TIER == 1 && SPARSE_24>(bx[i], x, col, g, t, T, K);
    }
#pragma unroll
    for (int i = 0; i < CH; ++i) {
        const int block_row = ONE_ROW ? row : __shfl_sync(FULL, lane_row, i);
        if (i < n) {
            if (!ONE_ROW && block_row != row) { flush(acc, ws, row, g, t, T, NPAD); row = block_row; }
            if (TIER == 1 && SPARSE_24) {
                const u32 e = (raw[i][2] & 0xffffu) | (raw[i][3] << 16);  // rows g and g+8
#pragma unroll
                for (int tile = 0; tile < NTILE; ++tile)
                    mma_sp_16816(acc[tile], raw[i][0], raw[i][1], bx[i][tile].x, bx[i][tile].y, e);
            } else {
                u32 a[4];
                fragment<TIER>(a, raw[i], sel, t);
                mma_tiles(acc, a[0], a[1], a[2], a[3], bx[i]);
            }
        }
    }
}

// A warp's chunk: which tier, its first block, its size, and its blocks' columns and block-rows (lane i: block i).
struct Chunk {
    int tier, start, n, lane_col, lane_row;
};

// Chunk `wid`: its tier and bounds, and the index loads of its blocks.
__device__ __forceinline__ Chunk chunk_of(int wid, int lane, int n_dense, int n_nm, int n_topk, int w_dense, int w_nm,
                                          const short* __restrict__ block_rows, const short* __restrict__ dense_cols,
                                          const short* __restrict__ nm_cols, const short* __restrict__ topk_cols) {
    Chunk c;
    const short* cols;
    int offset;  // of the tier's blocks in block_rows
    if (wid < w_dense) {
        c = {0, wid * CHUNK, CHUNK, 0, 0};
        cols = dense_cols, offset = 0, c.n = min(c.n, n_dense - c.start);
    } else if (wid < w_dense + w_nm) {
        c = {1, (wid - w_dense) * CHUNK, CHUNK, 0, 0};
        cols = nm_cols, offset = n_dense, c.n = min(c.n, n_nm - c.start);
    } else {
        c = {2, (wid - w_dense - w_nm) * TOPK_CHUNK, TOPK_CHUNK, 0, 0};
        cols = topk_cols, offset = n_dense + n_nm, c.n = min(c.n, n_topk - c.start);
    }
    if (lane < c.n) {
        c.lane_col = cols[c.start + lane];
        c.lane_row = block_rows[offset + c.start + lane];
    }
    return c;
}

// A TopK chunk of n blocks from `start` (lane col_lane0 + i holds block i's column, lane i its block-row): the entries of
// TOPK_PER_ROUND blocks at a time are scattered into the warp's zeroed tiles, read back as A fragments, and
// zeroed again. ONE_ROW: every block is in one block-row (the row kernel), so no flushes.
template <bool ONE_ROW>
__device__ __forceinline__ void topk_blocks(float (*acc)[4], int& row, int n, int start, int lane_col, int col_lane0,
                                            int lane_row,
                                            const u16* __restrict__ topk_values,
                                            const unsigned char* __restrict__ topk_pos, const u16* __restrict__ x,
                                            u16* tile, float* __restrict__ ws, int lane, int g, int t, int T, int K,
                                            int NPAD) {
    // Lane e of round r holds entry e % TOPK of the round's block e / TOPK: its tile slot and value.
    const int r_block = lane / TOPK, entry = lane % TOPK;
    int slot[TOPK_ROUNDS];
    u16 value[TOPK_ROUNDS];
#pragma unroll
    for (int r = 0; r < TOPK_ROUNDS; ++r) {
        const int i = r * TOPK_PER_ROUND + r_block;
        slot[r] = -1;
        if (r_block < TOPK_PER_ROUND && i < n) {
            const size_t e = (size_t)(start + i) * TOPK + entry;
            slot[r] = r_block * 256 + topk_pos[e];
            value[r] = topk_values[e];
        }
    }
    uint2 bx[TOPK_CHUNK][NTILE];
#pragma unroll
    for (int i = 0; i < TOPK_CHUNK; ++i) {
        const int col = __shfl_sync(FULL, lane_col, col_lane0 + i);
        if (i < n) load_x<ONE_ROW && X_BLOCK_MAJOR>(bx[i], x, col, g, t, T, K);
    }
#pragma unroll
    for (int r = 0; r < TOPK_ROUNDS; ++r) {
        if (slot[r] >= 0) tile[slot[r]] = value[r];  // positions are distinct: no two lanes share a slot
        __syncwarp();
#pragma unroll
        for (int q = 0; q < TOPK_PER_ROUND; ++q) {
            const int i = r * TOPK_PER_ROUND + q;
            if (i < TOPK_CHUNK) {
                const int block_row = __shfl_sync(FULL, lane_row, i);
                if (i < n) {
                    const uint2* block = reinterpret_cast<const uint2*>(tile + q * 256);
                    const uint2 lo = block[g * 4 + t], hi = block[(g + 8) * 4 + t];
                    if (!ONE_ROW && block_row != row) { flush(acc, ws, row, g, t, T, NPAD); row = block_row; }
                    mma_tiles(acc, lo.x, hi.x, lo.y, hi.y, bx[i]);
                }
            }
        }
        __syncwarp();
        if (slot[r] >= 0) tile[slot[r]] = 0;
        __syncwarp();  // the next round's entries land on a zeroed tile
    }
}

// (The minimum of one CTA per SM is the build timed on the H200; without it ptxas caps 8-warp CTAs at 128
// registers and spills.)
extern "C" __global__ void __launch_bounds__(WARPS * 32, 1) hybrid_mma_decode(
    const u16* __restrict__ x,              // (T, K)
    float* __restrict__ ws,                 // (T, NPAD) fp32, zero on entry
    const short* __restrict__ block_rows,   // (nd + nn + nt,) block-row of every block, tiers in order
    const uint2* __restrict__ dense_values, // (nd, 16, 16) as 8-byte words
    const short* __restrict__ dense_cols,
    const u32* __restrict__ nm_values,      // (nn, 16, 8) as 4-byte words: a group's two kept values each
    const u16* __restrict__ nm_meta,        // (nn, 16, 2 bytes): a row's four groups, 4 bits each
    const short* __restrict__ nm_cols,
    const u16* __restrict__ topk_values,    // (nt, TOPK)
    const unsigned char* __restrict__ topk_pos,
    const short* __restrict__ topk_cols,
    int n_dense, int n_nm, int n_topk, int w_dense, int w_nm, int w_total, int T, int K, int NPAD) {
    __shared__ uint2 sel[16];
    __shared__ u16 tiles[WARPS][TOPK_PER_ROUND][256];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    if (threadIdx.x < 16) sel[threadIdx.x] = kSelectors[threadIdx.x];
    for (int i = lane; i < TOPK_PER_ROUND * 256; i += 32) (&tiles[warp][0][0])[i] = 0;
    __syncthreads();

    float acc[NTILE][4];
#pragma unroll
    for (int tile = 0; tile < NTILE; ++tile)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[tile][i] = 0.f;

    const int wid = blockIdx.x * WARPS + warp;
    if (wid >= w_total) return;  // the grid's last CTA has spare warps
    const Chunk c = chunk_of(wid, lane, n_dense, n_nm, n_topk, w_dense, w_nm, block_rows, dense_cols, nm_cols,
                             topk_cols);
    const int start = c.start, n = c.n, lane_col = c.lane_col, lane_row = c.lane_row;
    int row = __shfl_sync(FULL, lane_row, 0);
    if (c.tier == 0)
        stream_blocks<0, CHUNK, false>(acc, row, n, start, lane_col, 0, lane_row, dense_values, nullptr, x, sel, ws, g,
                                       t, T, K, NPAD);
    else if (c.tier == 1)
        stream_blocks<1, CHUNK, false>(acc, row, n, start, lane_col, 0, lane_row, nm_values, nm_meta, x, sel, ws, g, t,
                                       T, K, NPAD);
    else
        topk_blocks<false>(acc, row, n, start, lane_col, 0, lane_row, topk_values, topk_pos, x, &tiles[warp][0][0], ws,
                           lane, g, t, T, K, NPAD);
    flush(acc, ws, row, g, t, T, NPAD);
}

// out[token][r] = ws[token][r] rounded to the weight's dtype, for r < N; ws zeroed again for the next call.
extern "C" __global__ void hybrid_cast_and_zero(float* __restrict__ ws, u16* __restrict__ out, int T, int N, int NPAD) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * N) return;
    const int token = i / N, r = i - token * N;
    float* src = ws + (size_t)token * NPAD + r;
    const float v = *src;
    *src = 0.f;
    out[i] = from_float(v);
}

// ---------------------------------------------------------------------------------------------------------------
// The row kernel: one CTA per block-row, so that nothing leaves the CTA but the output.
//
// The chunk kernel above spreads a weight's blocks over warps regardless of block-row; its partial sums go to a
// fp32 workspace with global atomics, and a second kernel writes the output and zeroes the workspace (about
// 2 us of a 13 us product at 4096x4096). Here a CTA owns block-row r: its WARPS warps split each tier's blocks
// of that row, keep their mma accumulators in registers over all of them (a block-row's blocks all add into
// the same 16 rows), and write them to shared memory at the end, where they are added in warp order (the same
// bits on every call). Nothing is kept between calls (no workspace, no per-weight state). (TopK entries added
// one by one into shared sums with atomics, without the tensor cores, were 1.3x slower than this at one token
// and 4.6x at 16, all-TopK 4096x4096 on an H100: the shared atomics of 16 rows collide.)
//

// The block columns of a warp's next 32 / CH steps of CH blocks (lane l: step l / CH, block l % CH), the steps
// starting at `start`, WARPS * CH blocks apart; 0 past `end`. One load gives the x loads of several steps their
// addresses, so that they wait on no index load but the first.
template <int CH>
__device__ __forceinline__ int step_cols(const short* __restrict__ cols, int start, int end, int lane) {
    const int block = start + (lane / CH) * (WARPS * CH) + lane % CH;
    return lane < (32 / CH) * CH && block < end ? cols[block] : 0;
}

// A warp's dense (TIER 0) or 2:4 (TIER 1) blocks of one block-row: steps of CH blocks from `first`, WARPS * CH
// apart; lane_cols holds the first steps' columns (step_cols).
template <int TIER, int CH>
__device__ __forceinline__ void row_blocks(float (*acc)[4], int first, int end, int lane_cols, int lane,
                                           const void* __restrict__ values, const u16* __restrict__ meta,
                                           const short* __restrict__ cols, const u16* __restrict__ x,
                                           const uint2* sel, int g, int t, int T, int K) {
    int same_row = 0, step = 0;
    for (int start = first; start < end; start += WARPS * CH, ++step) {
        if (step == 32 / CH) step = 0, lane_cols = step_cols<CH>(cols, start, end, lane);
        stream_blocks<TIER, CH, true>(acc, same_row, min(CH, end - start), start, lane_cols, step * CH, 0, values,
                                      meta, x, sel, nullptr, g, t, T, K, 0);
    }
}


// A row-kernel warp's shared memory, in 16-bit halves: its TopK tiles, or its fp32 sums of NTILE * 8 tokens x 16
// rows.
#define ROW_SUM_HALVES (NTILE * 8 * 16 * 2)
#define ROW_TILE_HALVES (TOPK_PER_ROUND * 256)
#define ROW_SCRATCH_HALVES (ROW_SUM_HALVES > ROW_TILE_HALVES ? ROW_SUM_HALVES : ROW_TILE_HALVES)

#if ROWS_MIN_CTAS
#define ROWS_BOUNDS __launch_bounds__(WARPS * 32, ROWS_MIN_CTAS)
#else
#define ROWS_BOUNDS __launch_bounds__(WARPS * 32)
#endif
extern "C" __global__ void ROWS_BOUNDS hybrid_rows_decode(
    const u16* __restrict__ x,              // (T, K), or (K / 16, NTILE * 8, 16) where X_BLOCK_MAJOR
    u16* __restrict__ out,                  // (T, N)
    const uint2* __restrict__ dense_values, // (nd, 16, 16) as 8-byte words
    const short* __restrict__ dense_cols,
    const int* __restrict__ dense_row_ptr,  // (nbr + 1,)
    const u32* __restrict__ nm_values,      // (nn, 16, 8) as 4-byte words
    const u16* __restrict__ nm_meta,        // (nn, 16, 2 bytes)
    const short* __restrict__ nm_cols,
    const int* __restrict__ nm_row_ptr,
    const u16* __restrict__ topk_values,    // (nt, TOPK)
    const unsigned char* __restrict__ topk_pos,
    const short* __restrict__ topk_cols,
    const int* __restrict__ topk_row_ptr,
    int T, int K, int N) {
    __shared__ uint2 sel[16];
    // Each warp's own: its TopK tiles, then, once its blocks are done, its sums. (Declared as u16: the same
    // memory declared as words and cast to u16 made ptxas spill two registers in the capped two-tile configs.)
    __shared__ __align__(16) u16 scratch[WARPS][ROW_SCRATCH_HALVES];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int r = blockIdx.x;
    u16* const tiles = scratch[warp];
    if (threadIdx.x < 16) sel[threadIdx.x] = kSelectors[threadIdx.x];
    for (int i = lane; i < TOPK_PER_ROUND * 256; i += 32) tiles[i] = 0;
    __syncthreads();

    float acc[NTILE][4];
#pragma unroll
    for (int tile = 0; tile < NTILE; ++tile)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[tile][i] = 0.f;
    // Every tier's first block columns are loaded before any weight.
    const int dense_first = dense_row_ptr[r] + warp * CHUNK, dense_end = dense_row_ptr[r + 1];
    const int nm_first = nm_row_ptr[r] + warp * NM_CHUNK, nm_end = nm_row_ptr[r + 1];
    const int topk_first = topk_row_ptr[r] + warp * TOPK_CHUNK, topk_end = topk_row_ptr[r + 1];
    const int dense_lane_cols = step_cols<CHUNK>(dense_cols, dense_first, dense_end, lane);
    const int nm_lane_cols = step_cols<NM_CHUNK>(nm_cols, nm_first, nm_end, lane);
    int topk_lane_cols = step_cols<TOPK_CHUNK>(topk_cols, topk_first, topk_end, lane);
    row_blocks<0, CHUNK>(acc, dense_first, dense_end, dense_lane_cols, lane, dense_values, nullptr, dense_cols, x, sel, g, t,
                  T, K);
    row_blocks<1, NM_CHUNK>(acc, nm_first, nm_end, nm_lane_cols, lane, nm_values, nm_meta, nm_cols, x, sel, g, t, T, K);

    // TopK: chunks of TOPK_CHUNK blocks through the tensor cores, as in the chunk kernel.
    int same_row = r, step = 0;
    for (int start = topk_first; start < topk_end; start += WARPS * TOPK_CHUNK, ++step) {
        if (step == 32 / TOPK_CHUNK) step = 0, topk_lane_cols = step_cols<TOPK_CHUNK>(topk_cols, start, topk_end, lane);
        topk_blocks<true>(acc, same_row, min(TOPK_CHUNK, topk_end - start), start, topk_lane_cols, step * TOPK_CHUNK,
                          r, topk_values, topk_pos, x, tiles, nullptr, lane, g, t, T, K, 0);
    }

    // The warp's sums, [token][row of the block-row], over its own tiles (no lane reads them any more: the TopK
    // loop ends on a __syncwarp). The mma accumulators: c0..c3 at rows g, g, g+8, g+8 and tokens 2t, 2t+1, 2t,
    // 2t+1 of each 8-token tile.
    float* const sums = reinterpret_cast<float*>(scratch[warp]);
#pragma unroll
    for (int tile = 0; tile < NTILE; ++tile) {
        const int token = 8 * tile + 2 * t;
        sums[token * 16 + g] = acc[tile][0], sums[token * 16 + g + 8] = acc[tile][2];
        sums[(token + 1) * 16 + g] = acc[tile][1], sums[(token + 1) * 16 + g + 8] = acc[tile][3];
    }
    __syncthreads();
    // Added warp by warp in a fixed order, so that an output does not depend on which warp finished first: the
    // kernel gives the same bits on every call (shared atomics, as before session 28, did not; greedy decoding
    // drifted from run to run).
    for (int i = threadIdx.x; i < T * 16; i += WARPS * 32) {
        const int row = r * 16 + (i & 15);
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += reinterpret_cast<const float*>(scratch[w])[i];
        if (row < N) out[(size_t)(i >> 4) * N + row] = from_float(sum);
    }
}
