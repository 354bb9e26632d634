// The warp-specialized prefill kernel's producer decoding (kernels/cuda/wgmma_ws_blocks.cuh) run on the CPU: each
// lane of a warp is a thread, a shuffle or __syncwarp meets the warp's 32 threads at a barrier, and shared memory
// is a byte array. test_wgmma_prefill.py compiles this with g++ (-DHALF_T, -DTOPK, -I kernels/cuda) and reads back
// what the 4 producer warps write for one step of one CTA.
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __device__
#define __forceinline__ inline

struct uint2 {
    unsigned int x, y;
};

namespace {
struct Warp {
    std::barrier<> meet{32};
    unsigned int words[32];
};
thread_local Warp* this_warp = nullptr;
thread_local int this_lane = 0;
thread_local unsigned char* shared = nullptr;  // the stage's bytes; shared addresses are offsets into it

unsigned int exchange(unsigned int value, int source) {
    this_warp->words[this_lane] = value;
    this_warp->meet.arrive_and_wait();
    const unsigned int got = this_warp->words[source];
    this_warp->meet.arrive_and_wait();
    return got;
}
}  // namespace

template <class T>
T __shfl_sync(unsigned int, T value, int source) {
    return static_cast<T>(exchange(static_cast<unsigned int>(value), source & 31));
}
template <class T>
T __shfl_xor_sync(unsigned int, T value, int mask) {
    return static_cast<T>(exchange(static_cast<unsigned int>(value), this_lane ^ mask));
}
template <class T>
T __shfl_down_sync(unsigned int, T value, int delta) {  // past lane 31: the lane's own value, as on the GPU
    const int source = this_lane + delta < 32 ? this_lane + delta : this_lane;
    return static_cast<T>(exchange(static_cast<unsigned int>(value), source));
}
inline void __syncwarp() { this_warp->meet.arrive_and_wait(); }
template <class T>
T __ldg(const T* address) { return *address; }

#include "wgmma_common.cuh"

inline void st_shared_v4(u32 address, u32 a, u32 b, u32 c, u32 d) {
    const u32 words[4] = {a, b, c, d};
    std::memcpy(shared + address, words, 16);
}
inline void st_shared_v2(u32 address, u32 a, u32 b) {
    const u32 words[2] = {a, b};
    std::memcpy(shared + address, words, 8);
}
inline void st_shared_u32(u32 address, u32 a) { std::memcpy(shared + address, &a, 4); }
inline void st_shared_u16(u32 address, u32 a) {
    const u16 half = static_cast<u16>(a);
    std::memcpy(shared + address, &half, 2);
}
inline void cp_async_16_l2(u32 address, const void* global) { std::memcpy(shared + address, global, 16); }

#include "wgmma_ws_blocks.cuh"

// What the CTA's producer writes for step s: both groups' A tiles at stage[0, 2 * A_BYTES) and the metadata words
// at stage[2 * A_BYTES, 2 * A_BYTES + META_BYTES) (a stage's layout in wgmma_prefill_ws.cu, offsets from its start).
extern "C" void build_producer_step(unsigned char* stage, const u32* dense_words, const u32* nm_pairs,
                                    const u16* nm_meta, const u16* topk_values, const unsigned char* topk_pos,
                                    const u32* slots, const unsigned char* sparse_steps, int cta, int s,
                                    int block_cols, int steps) {
    for (int p = 0; p < 4; ++p) {
        Warp warp;
        std::vector<std::thread> lanes;
        for (int lane = 0; lane < 32; ++lane) {
            lanes.emplace_back([&, lane] {
                this_warp = &warp, this_lane = lane, shared = stage;
                StepWords words;
                const u32 sparse = sparse_steps[(size_t)(cta * 2 + (p >> 1)) * steps + s];
                load_step(words, lane_slot(slots, cta * 8, p, block_cols, s, lane), sparse, nm_pairs, nm_meta,
                          topk_values, topk_pos, lane);
                build_step(0u, 2 * A_BYTES, p, words, dense_words, lane);
            });
        }
        for (std::thread& lane : lanes) lane.join();
    }
}
