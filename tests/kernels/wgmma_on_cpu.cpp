// The wgmma prefill kernels (kernels/cuda/wgmma_prefill_ws.cu, and wgmma_prefill.cu, whose products the H100
// checked in sessions 33-36) run on the CPU. Each of a CTA's threads is a thread; a shuffle, __syncwarp or
// __syncthreads meets its warp's or CTA's threads at a barrier; shared memory is a byte array; an mbarrier counts
// arrivals and phases under a lock; cp.async copies at once; and a wgmma meets its warpgroup's 128 threads, one of
// which computes the product into every thread's accumulators (d[4j + i]: row g + 8 (i / 2) of the warp's 16,
// column 8j + 2t + (i % 2), as both kernels' epilogues read them). A comes from shared-memory descriptors (core
// matrices `leading` bytes apart along k, `stride` apart along rows) or from registers (a[0] row g columns 2t,
// 2t+1; a[1] row g+8; a[2], a[3] the same 8 columns on); sparse A: 64 x 16 kept values placed by the metadata of
// lanes t = 0, 1 of each quad (k16 half t, rows g | g+8 << 16), wgmma_prefill.cu's rule.
//
// test_wgmma_prefill.py writes a kernel's source (wgmma_prefill.py's) to kernel_source.cuh and builds this with
// g++ -std=c++20 -DHALF_T=... (as the source defines it: the host conversions below come before it) and
// -DWARP_SPECIALIZED=0 or 1. It is a model of what the PTX does, not the PTX: run on the H100-checked kernel it
// checks the model, run on the warp-specialized one that kernel's indexing, decoding and barrier protocol; not
// how the GPU reads an A descriptor, which only the warp-specialized kernel uses.
#ifndef HALF_T
#error "build with -DHALF_T=0 (bf16) or 1 (fp16), as the kernel's source defines it"
#endif
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(threads, blocks)
#define __shared__
#define __align__(bytes)

struct uint2 {
    unsigned int x, y;
};
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
struct Index {
    unsigned int x = 0, y = 0, z = 0;
};
thread_local Index threadIdx, blockIdx;
alignas(128) unsigned char shared[256 * 1024];  // one CTA's; CTAs run one after another

namespace host {
struct Group {  // threads that meet: a warp (32), a warpgroup (128) or the CTA (384)
    explicit Group(int size) : meet(size) {}
    std::barrier<> meet;
    unsigned int words[128];
    unsigned int a_registers[128][4];
    float* accumulators[128];
};
thread_local Group* warp = nullptr;
thread_local Group* warpgroup = nullptr;
thread_local Group* cta = nullptr;
thread_local int lane = 0, rank = 0;  // in the warp, in the warpgroup

unsigned int exchange(unsigned int value, int source) {
    warp->words[lane] = value;
    warp->meet.arrive_and_wait();
    const unsigned int got = warp->words[source];
    warp->meet.arrive_and_wait();
    return got;
}

struct Mbarrier {  // arrivals counted down to the next phase; `phases` completed so far
    std::mutex lock;
    std::condition_variable changed;
    unsigned int expected = 0, pending = 0, phases = 0;
};
std::mutex table_lock;
std::unordered_map<unsigned int, std::unique_ptr<Mbarrier>> mbarriers;  // by shared-memory address

Mbarrier& mbarrier_at(unsigned int address) {
    std::lock_guard<std::mutex> guard(table_lock);
    std::unique_ptr<Mbarrier>& slot = mbarriers[address];
    if (!slot) slot = std::make_unique<Mbarrier>();
    return *slot;
}

[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "wgmma_on_cpu: %s\n", what);
    std::fflush(stderr);
    std::abort();
}
}  // namespace host

template <class T>
T __shfl_sync(unsigned int, T value, int source) {
    return static_cast<T>(host::exchange(static_cast<unsigned int>(value), source & 31));
}
template <class T>
T __shfl_xor_sync(unsigned int, T value, int mask) {
    return static_cast<T>(host::exchange(static_cast<unsigned int>(value), host::lane ^ mask));
}
template <class T>
T __shfl_down_sync(unsigned int, T value, int delta) {  // past lane 31: the lane's own value, as on the GPU
    const int source = host::lane + delta < 32 ? host::lane + delta : host::lane;
    return static_cast<T>(host::exchange(static_cast<unsigned int>(value), source));
}
inline void __syncwarp() { host::warp->meet.arrive_and_wait(); }
inline void __syncthreads() { host::cta->meet.arrive_and_wait(); }
template <class T>
T __ldg(const T* address) { return *address; }
inline size_t __cvta_generic_to_shared(const void* address) {
    return static_cast<const unsigned char*>(address) - shared;
}
[[noreturn]] inline void __trap() { host::fail("trap"); }

// Shared memory.
inline void st_shared_v4(unsigned int address, unsigned int a, unsigned int b, unsigned int c, unsigned int d) {
    const unsigned int words[4] = {a, b, c, d};
    std::memcpy(shared + address, words, 16);
}
inline void st_shared_v2(unsigned int address, unsigned int a, unsigned int b) {
    const unsigned int words[2] = {a, b};
    std::memcpy(shared + address, words, 8);
}
inline void st_shared_u32(unsigned int address, unsigned int a) { std::memcpy(shared + address, &a, 4); }
inline void st_shared_u16(unsigned int address, unsigned int a) {
    const unsigned short half = static_cast<unsigned short>(a);
    std::memcpy(shared + address, &half, 2);
}
inline void st_shared_u8(unsigned int address, unsigned int a) { shared[address] = static_cast<unsigned char>(a); }
inline unsigned int ld_shared_u32(unsigned int address) {
    unsigned int a;
    std::memcpy(&a, shared + address, 4);
    return a;
}
inline unsigned int ld_shared_u8(unsigned int address) { return shared[address]; }
inline void cp_async_16(unsigned int address, const void* global, bool valid) {
    if (valid) std::memcpy(shared + address, global, 16);
    else std::memset(shared + address, 0, 16);
}
inline void cp_async_16_l2(unsigned int address, const void* global) { std::memcpy(shared + address, global, 16); }
inline void cp_async_commit() {}
template <int pending>
inline void cp_async_wait() {}
inline void cp_async_wait_all() {}
inline void fence_stores_for_wgmma() {}

// mbarriers: init by one thread before a __syncthreads, as the kernel does.
inline void mbarrier_init(unsigned int address, unsigned int count) {
    host::Mbarrier& barrier = host::mbarrier_at(address);
    barrier.expected = barrier.pending = count, barrier.phases = 0;
}
inline void mbarrier_arrive(unsigned int address) {
    host::Mbarrier& barrier = host::mbarrier_at(address);
    std::lock_guard<std::mutex> guard(barrier.lock);
    if (barrier.pending == 0) host::fail("an arrival on a barrier with none pending");
    if (--barrier.pending == 0) {
        barrier.pending = barrier.expected, ++barrier.phases;
        barrier.changed.notify_all();
    }
}
inline void mbarrier_arrive_when_copied(unsigned int address) { mbarrier_arrive(address); }  // copies are done
// try_wait.parity(P) holds once the current phase's parity differs from P (a new barrier: P = 1 holds at once).
inline void mbarrier_wait(unsigned int address, unsigned int parity) {
    host::Mbarrier& barrier = host::mbarrier_at(address);
    std::unique_lock<std::mutex> guard(barrier.lock);
    if (!barrier.changed.wait_for(guard, std::chrono::seconds(20), [&] { return (barrier.phases & 1u) != parity; }))
        host::fail("an mbarrier wait that never ended (the kernel would trap)");
}

// wgmma, synchronous: the fence, commit and waits have nothing to order.
inline void wgmma_fence() {}
inline void wgmma_commit() {}
template <int pending>
inline void wgmma_wait() {}

namespace host {
float to_float(unsigned short bits) {  // a 16-bit operand
#if HALF_T
    _Float16 half;
    std::memcpy(&half, &bits, 2);
    return static_cast<float>(half);
#else
    const unsigned int word = static_cast<unsigned int>(bits) << 16;
    float v;
    std::memcpy(&v, &word, 4);
    return v;
#endif
}

float value_at(unsigned int address) {
    unsigned short bits;
    std::memcpy(&bits, shared + address, 2);
    return to_float(bits);
}

// Element (row, k) of a K-major operand whose descriptor is `descriptor`.
unsigned int element(unsigned long long descriptor, int row, int k) {
    const unsigned int start = (descriptor & 0x3FFF) << 4, leading = ((descriptor >> 16) & 0x3FFF) << 4;
    const unsigned int stride = ((descriptor >> 32) & 0x3FFF) << 4;
    return start + (k >> 3) * leading + (row >> 3) * stride + (row & 7) * 16 + (k & 7) * 2;
}

// Element (row, k < 16) of A held in the warpgroup's registers.
float register_element(const Group& group, int row, int k) {
    const int thread = (row >> 4) * 32 + (row & 7) * 4 + ((k & 7) >> 1), word = ((row >> 3) & 1) + 2 * (k >> 3);
    const unsigned int bits = group.a_registers[thread][word];
    return to_float(static_cast<unsigned short>(k & 1 ? bits >> 16 : bits & 0xFFFFu));
}

// D (64 x 256) += A (64 x k) B (256 x k)^T over the warpgroup's accumulators; A from a descriptor or, where
// `a_registers` is given, from the threads' registers; sparse: A is 64 x 16 kept values of a 64 x 32 matrix,
// placed by the metadata words its threads hand in.
void wgmma(float* d, unsigned long long a, const unsigned int* a_registers, unsigned long long b, unsigned int e,
           bool sparse) {
    Group& group = *warpgroup;
    group.accumulators[rank] = d, group.words[rank] = e;
    if (a_registers) std::memcpy(group.a_registers[rank], a_registers, 16);
    group.meet.arrive_and_wait();
    if (rank == 0) {
        auto a_at = [&](int row, int c) {
            return a_registers ? register_element(group, row, c) : value_at(element(a, row, c));
        };
        const int k = sparse ? 32 : 16;
        std::vector<float> A(64 * k, 0.f), B(256 * k);
        for (int row = 0; row < 64; ++row) {
            if (!sparse) {
                for (int c = 0; c < 16; ++c) A[row * k + c] = a_at(row, c);
                continue;
            }
            const int w = row >> 4, g = row & 7, upper = (row >> 3) & 1;
            for (int half = 0; half < 2; ++half) {
                const unsigned int nibbles = group.words[w * 32 + g * 4 + half] >> (16 * upper) & 0xFFFFu;
                for (int quad = 0; quad < 4; ++quad) {
                    const unsigned int nibble = nibbles >> (4 * quad) & 15u, p0 = nibble & 3u, p1 = nibble >> 2;
                    if (p0 >= p1) fail("sparse metadata that names no ascending pair");
                    const int kept = 8 * half + 2 * quad;
                    A[row * k + 16 * half + 4 * quad + p0] = a_at(row, kept);
                    A[row * k + 16 * half + 4 * quad + p1] = a_at(row, kept + 1);
                }
            }
        }
        for (int n = 0; n < 256; ++n)
            for (int c = 0; c < k; ++c) B[n * k + c] = value_at(element(b, n, c));
        for (int thread = 0; thread < 128; ++thread) {
            const int w = thread >> 5, g = (thread & 31) >> 2, t = thread & 3;
            for (int j = 0; j < 32; ++j)
                for (int i = 0; i < 4; ++i) {
                    const int row = 16 * w + g + 8 * (i >> 1), n = 8 * j + 2 * t + (i & 1);
                    float sum = 0.f;
                    for (int c = 0; c < k; ++c) sum += A[row * k + c] * B[n * k + c];
                    group.accumulators[thread][4 * j + i] += sum;
                }
        }
    }
    group.meet.arrive_and_wait();
}
}  // namespace host

inline void wgmma_dense_ss(float* d, unsigned long long a, unsigned long long b) {
    host::wgmma(d, a, nullptr, b, 0u, false);
}
inline void wgmma_sparse_ss(float* d, unsigned long long a, unsigned long long b, unsigned int e) {
    host::wgmma(d, a, nullptr, b, e, true);
}
inline void wgmma_dense(float* d, const unsigned int* a, unsigned long long b) { host::wgmma(d, 0, a, b, 0u, false); }
inline void wgmma_sparse(float* d, const unsigned int* a, unsigned long long b, unsigned int e) {
    host::wgmma(d, 0, a, b, e, true);
}

inline unsigned short from_float(float v) {  // round to nearest even, as cvt.rn
#if HALF_T
    const _Float16 half = static_cast<_Float16>(v);
    unsigned short bits;
    std::memcpy(&bits, &half, 2);
    return bits;
#else
    unsigned int word;
    std::memcpy(&word, &v, 4);
    return static_cast<unsigned short>((word + 0x7FFFu + ((word >> 16) & 1u)) >> 16);
#endif
}

#include "kernel_source.cuh"

namespace host {
// Runs `body(thread)` on the CTA's 384 threads, each knowing its warp, warpgroup and the CTA.
template <class Body>
void run_cta(int threads, Body body) {
    Group whole(threads);
    std::vector<std::unique_ptr<Group>> warps, warpgroups;
    for (int i = 0; i < threads / 32; ++i) warps.push_back(std::make_unique<Group>(32));
    for (int i = 0; i < threads / 128; ++i) warpgroups.push_back(std::make_unique<Group>(128));
    std::vector<std::thread> team;
    for (int thread = 0; thread < threads; ++thread) {
        team.emplace_back([&, thread] {
            warp = warps[thread / 32].get(), warpgroup = warpgroups[thread / 128].get(), cta = &whole;
            lane = thread & 31, rank = thread & 127;
            body(thread);
        });
    }
    for (std::thread& member : team) member.join();
}
}  // namespace host

#if WARP_SPECIALIZED
#define KERNEL hybrid_wgmma_prefill_ws
#define THREADS 384
#else
#define KERNEL hybrid_wgmma_prefill
#define THREADS 256
#endif

// The kernel over a grid of CTAs, one CTA at a time.
extern "C" void run_kernel(int grid_x, int grid_y, const u16* x, u16* y, const u32* dense_words, const u32* nm_pairs,
                           const u16* nm_meta, const u16* topk_values, const unsigned char* topk_pos,
                           const u32* slots, const unsigned char* sparse_steps, const int* group_rows, int T, int K,
                           int R) {
    for (unsigned int by = 0; by < static_cast<unsigned int>(grid_y); ++by)
        for (unsigned int bx = 0; bx < static_cast<unsigned int>(grid_x); ++bx) {
            std::memset(shared, 0xA5, sizeof shared);  // garbage where nothing was written
            host::mbarriers.clear();
            host::run_cta(THREADS, [&](int thread) {
                threadIdx.x = thread, blockIdx.x = bx, blockIdx.y = by;
                KERNEL(x, y, dense_words, nm_pairs, nm_meta, topk_values, topk_pos, slots, sparse_steps, group_rows,
                       T, K, R);
            });
        }
}

#if WARP_SPECIALIZED
// What the CTA's 4 producer warps write for step s alone (wgmma_ws_blocks.cuh's build_step): both groups' A tiles
// at stage[0, 2 * A_BYTES), then the metadata words (META_BYTES).
extern "C" void build_producer_step(unsigned char* stage, const u32* dense_words, const u32* nm_pairs,
                                    const u16* nm_meta, const u16* topk_values, const unsigned char* topk_pos,
                                    const u32* slots, const unsigned char* sparse_steps, int cta, int s,
                                    int block_cols, int steps) {
    std::memset(shared, 0, 2 * A_BYTES + META_BYTES);
    host::run_cta(128, [&](int thread) {
        const int p = thread >> 5, lane = thread & 31;
        StepWords words;
        const u32 sparse = sparse_steps[(size_t)(cta * 2 + (p >> 1)) * steps + s];
        load_step(words, lane_slot(slots, cta * 8, p, block_cols, s, lane), sparse, nm_pairs, nm_meta, topk_values,
                  topk_pos, lane);
        build_step(0u, 2 * A_BYTES, p, words, dense_words, lane);
    });
    std::memcpy(stage, shared, 2 * A_BYTES + META_BYTES);
}
#endif
