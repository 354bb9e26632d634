// The warp-specialized prefill kernel's decoding (wgmma_prefill_ws.cu): how its producer warps turn a step's packed
// blocks into wgmma's A tiles and sparse metadata in shared memory. Apart from the kernel so that a CPU test can run
// it alone (tests/kernels/wgmma_on_cpu.cpp: each lane a thread, shuffles through a barrier) and check what it writes.
// Needs wgmma_common.cuh, and the shared-memory stores st_shared_v4 / v2 / u16 / u32 and cp_async_16_l2.

#define A_BYTES 4096                  // one consumer warpgroup's A for one step: 64 rows x 32 columns of 16 bits
#define META_BYTES 512                // one step's metadata words: 8 members x 16
#define ROW_NIBBLES_EMPTY 0x4444u     // a row of zeros in a sparse step: positions 0 and 1 in each group

// Producer warp p's slot word of lane `lane` for step s: lanes 0-3 hold block b = lane (member 2p + b / 2 of the
// CTA's 8 from first_member, column b % 2 of the step), the others 0.
__device__ __forceinline__ u32 lane_slot(const u32* __restrict__ slots, int first_member, int p, int block_cols,
                                         int s, int lane) {
    const int member = first_member + 2 * p + ((lane >> 1) & 1);
    return lane < 4 ? __ldg(slots + (size_t)member * block_cols + 2 * s + (lane & 1)) : 0u;
}

// What a producer lane holds of one step, loaded two steps before it is built: per block (b = 2 * member + column
// of the warp's 2 x 2), its slot and, for a 2:4 block, this lane's row's pairs of groups 2h, 2h+1 (w0, w1) and the
// row's four nibbles (meta); for a TopK block, entry lane (value | position << 16) in w0.
struct StepWords {
    u32 slot[4], w0[4], w1[4], meta[4];
    u32 sparse;  // the step runs as one wgmma.sp for this warp's group
};

__device__ __forceinline__ void load_step(StepWords& words, u32 lane_slot, u32 sparse,
                                          const u32* __restrict__ nm_pairs, const u16* __restrict__ nm_meta,
                                          const u16* __restrict__ topk_values,
                                          const unsigned char* __restrict__ topk_pos, int lane) {
    const int r = lane >> 1, h = lane & 1;
    words.sparse = sparse;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const u32 slot = __shfl_sync(FULL, lane_slot, b), tier = slot >> TIER_SHIFT;
        const u32 index = slot & ((1u << TIER_SHIFT) - 1);
        words.slot[b] = slot, words.w0[b] = 0u, words.w1[b] = 0u, words.meta[b] = 0u;
        if (tier == TIER_NM) {
            const uint2 pairs = __ldg(reinterpret_cast<const uint2*>(nm_pairs + (size_t)index * 64 + r * 4 + 2 * h));
            words.w0[b] = pairs.x, words.w1[b] = pairs.y;
            words.meta[b] = __ldg(nm_meta + (size_t)index * 16 + r);
        } else if (tier == TIER_TOPK && lane < TOPK) {
            words.w0[b] = static_cast<u32>(__ldg(topk_values + (size_t)index * TOPK + lane)) |
                          static_cast<u32>(__ldg(topk_pos + (size_t)index * TOPK + lane)) << 16;
        }
    }
}

// A dense step's block: 16 rows x 16 columns at k-core matrices 2c, 2c+1 of its warpgroup's A tile; this lane's
// piece is row r, columns 8h..8h+7.
__device__ __forceinline__ void build_dense_block(u32 tile, int w, int c, u32 slot, u32 w0, u32 w1, u32 meta,
                                                  const u32* __restrict__ dense_words, int lane) {
    const int r = lane >> 1, h = lane & 1;
    const u32 tier = slot >> TIER_SHIFT, index = slot & ((1u << TIER_SHIFT) - 1);
    const u32 piece = tile + (2 * c + h) * 1024 + (2 * w + (r >> 3)) * 128 + (r & 7) * 16;
    if (tier == TIER_DENSE) {
        cp_async_16_l2(piece, dense_words + (size_t)index * 128 + r * 8 + h * 4);
    } else if (tier == TIER_NM) {
        u32 out[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // word j: columns 8h + 2j, +1, positions 2(j & 1), +1 of group 2h + j / 2
            const u32 pair = j < 2 ? w0 : w1, nibble = (meta >> (4 * (2 * h + (j >> 1)))) & 15u;
            out[j] = nm_value_at(pair, nibble, 2 * (j & 1)) | nm_value_at(pair, nibble, 2 * (j & 1) + 1) << 16;
        }
        st_shared_v4(piece, out[0], out[1], out[2], out[3]);
    } else {
        st_shared_v4(piece, 0u, 0u, 0u, 0u);
        if (tier == TIER_TOPK) {  // zeros first, then each entry over them
            __syncwarp();
            if (lane < TOPK) {
                const u32 position = w0 >> 16, row = position >> 4, col = position & 15u;
                st_shared_u16(tile + (2 * c + (col >> 3)) * 1024 + (2 * w + (row >> 3)) * 128 + (row & 7) * 16 +
                                  (col & 7) * 2, w0);
            }
        }
    }
}

// A sparse step's block (2:4, or TopK with at most 2 nonzero entries per group of 4; the plan checked): its 16
// rows' kept pairs at k-core matrix c of the compressed A tile (this lane: row r, groups 2h and 2h+1, 8 bytes), and
// its rows' nibbles: returns this lane's row's four.
__device__ __forceinline__ u32 build_sparse_block(u32 tile, int w, int c, u32 slot, u32 w0, u32 w1, u32 meta,
                                                  int lane) {
    const int r = lane >> 1, h = lane & 1;
    const u32 tier = slot >> TIER_SHIFT;
    const u32 piece = tile + c * 1024 + (2 * w + (r >> 3)) * 128 + (r & 7) * 16 + h * 8;
    if (tier == TIER_NM) {
        st_shared_v2(piece, w0, w1);
        return meta;
    }
    Cell first, second;  // groups 2h and 2h+1 of row r
    if (tier == TIER_TOPK) {
#pragma unroll
        for (int j = 0; j < TOPK; ++j) {
            const u32 entry = __shfl_sync(FULL, w0, j);
            const u32 row = entry >> 20, col = (entry >> 16) & 15u, value = entry & 0xffffu;
            const bool mine = row == static_cast<u32>(r) && (col >> 3) == static_cast<u32>(h) && (value & 0x7fffu);
            first.add(mine && !(col & 4u), value, col & 3u);
            second.add(mine && (col & 4u), value, col & 3u);
        }
        first.finish(), second.finish();
    }
    st_shared_v2(piece, first.pair(), second.pair());
    const u32 mine = first.nibble() | second.nibble() << 4, other = __shfl_xor_sync(FULL, mine, 1);
    return tier == TIER_TOPK ? (h ? other | mine << 8 : mine | other << 8) : ROW_NIBBLES_EMPTY;
}

// Producer warp p's share of one step: its 4 blocks (members 2p, 2p+1 of the CTA, group p / 2, both columns) into
// the A tile of its group (a_stage: both groups' tiles, A_BYTES apart) and, in a sparse step, their metadata words
// into meta_stage (member m's 16 words at m * 64).
__device__ __forceinline__ void build_step(u32 a_stage, u32 meta_stage, int p, const StepWords& now,
                                           const u32* __restrict__ dense_words, int lane) {
    const u32 tile = a_stage + (p >> 1) * A_BYTES;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const int member = 2 * p + (b >> 1), w = member & 3, c = b & 1;
        if (now.sparse) {
            const u32 row_nibbles = build_sparse_block(tile, w, c, now.slot[b], now.w0[b], now.w1[b], now.meta[b],
                                                       lane);
            const u32 lower = __shfl_down_sync(FULL, row_nibbles, 16);  // row r + 8's, from lane + 16
            if (lane < 16 && !(lane & 1))
                st_shared_u32(meta_stage + member * 64 + ((lane >> 1) * 2 + c) * 4, row_nibbles | lower << 16);
        } else {
            build_dense_block(tile, w, c, now.slot[b], now.w0[b], now.w1[b], now.meta[b], dense_words, lane);
        }
    }
}
