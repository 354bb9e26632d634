// Prefill through a packed hybrid weight on Hopper's warpgroup tensor cores, warp-specialized (sm_90a).
//
// The same product, plan and tiles as wgmma_prefill.cu (a CTA: two groups of 4 block-rows, 128 weight rows, for
// 256 tokens; K in steps of 32, each step of a group one wgmma.sp m64n256k32 where the plan marks it sparse, else
// two dense wgmma m64n256k16), built the other way round. That kernel's warps decode their own blocks into wgmma's
// A registers between the wgmmas, and each step waits at the warpgroup's fence for its slowest warp (session 36's
// profile: the tensor pipe busy 15% of the time). Here a third warpgroup, the producer, does all of the decoding
// and copying: it writes each step's A tiles (dense or compressed 2:4), the sparse steps' metadata words and x
// into a ring of STAGES shared-memory stages, and the two consumer warpgroups only wait for a stage, issue its
// wgmmas with A and B both read from shared memory, and hand the stage back. The producer runs up to STAGES steps
// ahead, so a TopK block's scatter or a slow weight load no longer sits between two wgmmas.
//
// Each stage has a `full` mbarrier (the producer's 128 threads arrive as their copies land, cp.async.mbarrier
// .arrive.noinc, after a proxy fence that makes their shared-memory stores visible to wgmma) and an `empty` one
// (each consumer warp arrives once the stage's wgmmas are done, wgmma.wait_group 1 a step later).
//
// The producer's warp p builds block-rows 2p and 2p+1 of the CTA (group p / 2), two blocks of each per step, each
// lane one 16-byte piece of a block: row lane / 2, columns 8 (lane % 2) to 8 (lane % 2) + 7 (wgmma_ws_blocks.cuh,
// which a CPU test runs lane by lane). The packed words a step needs are loaded two steps ahead into registers, its
// slots three steps ahead.
//
// Shared memory per stage (no swizzle; wgmma_common.cuh's core matrices): x, STEP_BYTES, as wgmma_prefill.cu; A of
// each consumer warpgroup, 64 rows x 32 columns (dense: core matrices 1024 bytes apart along k, 128 along the rows;
// sparse: 64 rows x 16 kept values, the same layout over two core matrices along k); 8 members x 16 metadata words
// (word 2g + c: block c's row g nibbles | row g+8's << 16, what lanes t = 0, 1 of a quad hand to wgmma.sp, as
// wgmma_prefill.cu's sparse_metadata); the groups' sparse flags.
//
// Compile-time constants (prepended by wgmma_prefill.py): HALF_T (0 bf16, 1 fp16), TOPK, LAUNCH_SHARED_BYTES (what
// the launch gives), WGMMA_D, WGMMA_D_OPERANDS.
//
// Built and assembled for sm_90a on the CPU (session 37), and run whole there in a model of the PTX
// (tests/kernels/wgmma_on_cpu.cpp); not yet run on a GPU.

#define STAGES 8
#define A_REGION (STAGES * STEP_BYTES)
#define META_REGION (A_REGION + STAGES * 2 * A_BYTES)
#define FLAG_REGION (META_REGION + STAGES * META_BYTES)
#define BARRIER_REGION (FLAG_REGION + STAGES * 16)
#define SHARED_BYTES (BARRIER_REGION + STAGES * 16)  // 200,960 bytes at 8 stages
static_assert(SHARED_BYTES <= LAUNCH_SHARED_BYTES, "wgmma_prefill.py launches with less shared memory");

// The GPU's side of the protocol; a CPU test defines its own (tests/kernels/wgmma_on_cpu.cpp) and runs the kernel
// below with every thread a thread.
#ifdef __CUDA_ARCH__

__device__ __forceinline__ void wgmma_dense_ss(float* d, u64 a, u64 b) {
    asm volatile("{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.sync.aligned.m64n256k16" WGMMA_TYPES " "
                 WGMMA_D ", %128, %129, p, 1, 1, 0, 0; }"
                 : WGMMA_D_OPERANDS : "l"(a), "l"(b));
}

__device__ __forceinline__ void wgmma_sparse_ss(float* d, u64 a, u64 b, u32 e) {
    asm volatile("{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.sp.sync.aligned.m64n256k32" WGMMA_TYPES " "
                 WGMMA_D ", %128, %129, %130, 0, p, 1, 1, 0, 0; }"
                 : WGMMA_D_OPERANDS : "l"(a), "l"(b), "r"(e));
}

__device__ __forceinline__ void mbarrier_init(u32 barrier, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(barrier), "r"(count) : "memory");
}

// Waits for the barrier's phase of this parity to complete. A wait that never ends traps instead (a launch error,
// not a hung GPU): each try_wait may suspend the thread a while, so 2^24 of them are seconds, far past any stage.
__device__ __forceinline__ void mbarrier_wait(u32 barrier, u32 parity) {
    u32 done = 0u;
    for (u32 tries = 0; !done; ++tries) {
        if (tries == (1u << 24)) __trap();
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }\n"
                     : "=r"(done) : "r"(barrier), "r"(parity) : "memory");
    }
}

__device__ __forceinline__ void mbarrier_arrive(u32 barrier) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(barrier) : "memory");
}

// The barrier counts one arrival of this thread once all of its cp.async so far have landed.
__device__ __forceinline__ void mbarrier_arrive_when_copied(u32 barrier) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(barrier) : "memory");
}

// This thread's shared-memory stores so far, made visible to the async proxy (wgmma's reads).
__device__ __forceinline__ void fence_stores_for_wgmma() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#endif  // __CUDA_ARCH__

extern "C" __global__ void __launch_bounds__(384, 1)
hybrid_wgmma_prefill_ws(const u16* __restrict__ x, u16* __restrict__ y,
                        const u32* __restrict__ dense_words,       // (nd, 16, 8) words: dense blocks, row-major
                        const u32* __restrict__ nm_pairs,          // (nn, 16, 4) words: 2:4 kept pairs
                        const u16* __restrict__ nm_meta,           // (nn, 16): a row's four nibbles
                        const u16* __restrict__ topk_values,       // (nt, TOPK)
                        const unsigned char* __restrict__ topk_pos,  // (nt, TOPK), row-major position in the block
                        const u32* __restrict__ slots,             // (groups * 4, K / 16): tier << 28 | index
                        const unsigned char* __restrict__ sparse_steps,  // (groups, K / 32): 1 = one wgmma.sp
                        const int* __restrict__ group_rows,        // (groups * 4): block-row of each member, -1 none
                        int T, int K, int R) {
    extern __shared__ __align__(128) unsigned char shared[];
    // The warp's role and each step's kind, shuffled from lane 0 so that ptxas sees them uniform across the warp:
    // wgmmas on a path it takes for divergent are serialized (ptxas C7520).
    const int warp = __shfl_sync(FULL, static_cast<int>(threadIdx.x >> 5), 0), lane = threadIdx.x & 31;
    const int token0 = blockIdx.x * TOKENS, steps = K / 32, block_cols = K / 16;
    const int first_member = blockIdx.y * 8;
    const u32 base = static_cast<u32>(__cvta_generic_to_shared(shared));
    const u32 full = base + BARRIER_REGION, empty = full + STAGES * 8;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(full + s * 8, 128);  // every producer thread, once its copies have landed
            mbarrier_init(empty + s * 8, 8);   // every consumer warp, once the stage's wgmmas are done
        }
    }
    __syncthreads();

    if (warp < 4) {
        // Producer: warp p builds members 2p, 2p+1 (block b: member 2p + b / 2, column b % 2 of the step).
        const int p = warp, group = blockIdx.y * 2 + (p >> 1);
        const unsigned char* my_steps = sparse_steps + (size_t)group * steps;
        auto slot_of_step = [&](int s) {
            return s < steps ? lane_slot(slots, first_member, p, block_cols, s, lane) : 0u;
        };
        auto sparse_of_step = [&](int s) { return s < steps ? static_cast<u32>(__ldg(my_steps + s)) : 0u; };
        StepWords words[3];
        load_step(words[0], slot_of_step(0), sparse_of_step(0), nm_pairs, nm_meta, topk_values, topk_pos, lane);
        load_step(words[1], slot_of_step(1), sparse_of_step(1), nm_pairs, nm_meta, topk_values, topk_pos, lane);
        u32 slot_ahead = slot_of_step(2);  // this lane's slot word of the next step to load

        // Step s from words[0] (loaded two steps ago); meanwhile step s+2's words into words[2]. The sets then
        // move down by register moves: a loop unrolled over three rotating sets tripled the producer's code.
        for (int s = 0; s < steps; ++s) {
            if (s + 2 < steps) {
                load_step(words[2], slot_ahead, sparse_of_step(s + 2), nm_pairs, nm_meta, topk_values, topk_pos, lane);
                slot_ahead = slot_of_step(s + 3);
            }
            const int stage = s % STAGES;
            mbarrier_wait(empty + stage * 8, ((s / STAGES) & 1) ^ 1);  // the consumers are done with its last use

            // x: 256 tokens x 32 columns, 4 lanes per token (its 64 contiguous bytes), 8 pieces per thread.
            const u32 x_stage = base + stage * STEP_BYTES;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int piece = threadIdx.x + i * 128, token = piece >> 2, chunk = piece & 3;
                const bool valid = token0 + token < T;
                cp_async_16(x_stage + chunk * TOKENS * 16 + token * 16,
                            x + (size_t)(valid ? token0 + token : 0) * K + s * 32 + chunk * 8, valid);
            }

            build_step(base + A_REGION + stage * 2 * A_BYTES, base + META_REGION + stage * META_BYTES, p, words[0],
                       dense_words, lane);
            if (!(p & 1) && lane == 0) st_shared_u8(base + FLAG_REGION + stage * 16 + (p >> 1), words[0].sparse);
            fence_stores_for_wgmma();  // the stores above
            mbarrier_arrive_when_copied(full + stage * 8);
            words[0] = words[1], words[1] = words[2];
        }
        cp_async_wait_all();
        return;
    }

    // Consumers: warpgroup q (0, 1) is group q of the CTA; its warp w holds member 4q + w's 16 rows.
    const int q = (warp >> 2) - 1, w = warp & 3, g = lane >> 2, t = lane & 3;
    const int member = 4 * q + w;
    float d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.f;
    for (int s = 0; s < steps; ++s) {
        const int stage = s % STAGES;
        mbarrier_wait(full + stage * 8, (s / STAGES) & 1);
        const u32 x_stage = base + stage * STEP_BYTES;
        const u32 tile = base + A_REGION + stage * 2 * A_BYTES + q * A_BYTES;
        const bool sparse = __shfl_sync(FULL, ld_shared_u8(base + FLAG_REGION + stage * 16 + q), 0);
        // The metadata word is a register operand like A's: written before the fence.
        const u32 e = sparse ? ld_shared_u32(base + META_REGION + stage * META_BYTES + member * 64 +
                                             (g * 2 + (t & 1)) * 4) : 0u;
        wgmma_fence();
        if (sparse) {
            wgmma_sparse_ss(d, smem_descriptor(tile, 1024, 128), x_descriptor(x_stage), e);
        } else {
            wgmma_dense_ss(d, smem_descriptor(tile, 1024, 128), x_descriptor(x_stage));
            wgmma_dense_ss(d, smem_descriptor(tile + 2048, 1024, 128), x_descriptor(x_stage + 2 * TOKENS * 16));
        }
        wgmma_commit();
        wgmma_wait<1>();  // step s-1's wgmmas are done
        if (s > 0 && lane == 0) mbarrier_arrive(empty + ((s - 1) % STAGES) * 8);
    }
    wgmma_wait<0>();

    store_rows(y, d, group_rows[first_member + member], token0, lane, T, R);
}
