// Shared by the CUDA kernels: the CUDA (or emulated) headers, launch and error helpers, float
// keys, block-wide scans and reductions, and the decoupled look-back that keeps compactions in
// index order within one pass.
#pragma once

#if defined(PYUNLEARN_CUDA_EMULATE)
#include "emulate.h"
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace pyunlearn {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- host side --------------------------------------------------------------------------------

inline void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess)
        throw std::runtime_error(std::string("pyunlearn CUDA kernels: ") + what + " failed: " + cudaGetErrorString(e));
}

// kernel<<<grid, threads, 0, stream>>>(args...), then the launch error. An empty grid is no launch.
template <class... P, class... A>
void launch(const char* name, void (*kernel)(P...), unsigned grid, unsigned threads, cudaStream_t stream, A... args) {
    if (grid == 0) return;
#if defined(PYUNLEARN_CUDA_EMULATE)
    (void)stream;
    check(pu_emu::launch(kernel, grid, threads, args...), name);
#else
    kernel<<<grid, threads, 0, stream>>>(args...);
    check(cudaGetLastError(), name);
#endif
}

inline int multiprocessors() {
    int device = 0, count = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    return count > 0 ? count : 1;
}

// Bump allocation of one workspace: regions aligned to 256 bytes.
struct Carve {
    size_t offset = 0;
    size_t take(size_t bytes) {
        const size_t at = offset;
        offset += (bytes + 255) / 256 * 256;
        return at;
    }
};

// A workspace taken with cudaMallocAsync on a stream and given back there, unless the caller
// lent one.
class Workspace {
public:
    Workspace(void* lent, size_t lent_bytes, size_t bytes, cudaStream_t stream) : stream_(stream) {
        if (lent != nullptr) {
            if (lent_bytes < bytes)
                throw std::invalid_argument("workspace has " + std::to_string(lent_bytes) + " bytes, " +
                                            std::to_string(bytes) + " needed");
            base_ = static_cast<char*>(lent);
        } else if (bytes > 0) {
            void* p = nullptr;
            check(cudaMallocAsync(&p, bytes, stream), "cudaMallocAsync (workspace)");
            base_ = static_cast<char*>(p);
            owned_ = true;
        }
    }
    ~Workspace() {
        if (owned_) cudaFreeAsync(base_, stream_);  // stream-ordered: after the queued kernels
    }
    Workspace(const Workspace&) = delete;
    Workspace& operator=(const Workspace&) = delete;
    template <class T>
    T* at(size_t offset) const {
        return reinterpret_cast<T*>(base_ + offset);
    }

private:
    cudaStream_t stream_;
    char* base_ = nullptr;
    bool owned_ = false;
};

// ---- device side ------------------------------------------------------------------------------

// min/max usable in device code without --expt-relaxed-constexpr (std::min is host-only there).
template <class T>
__host__ __device__ __forceinline__ T min_of(T a, T b) { return b < a ? b : a; }
template <class T>
__host__ __device__ __forceinline__ T max_of(T a, T b) { return a < b ? b : a; }

// |x| as unsigned bits (csrc/common.h): non-negative floats order like their bit patterns.
__device__ __forceinline__ uint32_t abs_key(float x) { return __float_as_uint(x) & 0x7fffffffu; }
constexpr uint32_t kNonFiniteKey = 0x7f800000u;

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31u; }
__device__ __forceinline__ unsigned warp_id() { return threadIdx.x >> 5; }
__device__ __forceinline__ unsigned lanemask_lt() { return (1u << lane_id()) - 1u; }

// The segment of a sorted table of starts (begin[0] = 0, L entries) that holds x: the largest i
// with begin[i] <= x (empty segments, begin[i] == begin[i + 1], are passed over).
template <class T>
__device__ __forceinline__ int find_segment(const T* begin, int count, T x) {
    int lo = 0, hi = count;  // answer in [lo, hi)
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (begin[mid] <= x) lo = mid; else hi = mid;
    }
    return lo;
}

// Warp-wide inclusive sum.
template <class T>
__device__ __forceinline__ T warp_inclusive_sum(T x) {
#pragma unroll
    for (unsigned offset = 1; offset < 32; offset <<= 1) {
        const T y = __shfl_up_sync(kFullMask, x, offset);
        if (lane_id() >= offset) x += y;
    }
    return x;
}

// One warp turns 128 counts (4 per lane, in index order) into their exclusive prefix sums, in
// place; returns this lane's inclusive sum of its 4 (lane 31's is the total).
__device__ __forceinline__ unsigned warp_exclusive_scan4(unsigned* counts) {
    unsigned v[4], sum = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        v[q] = counts[lane_id() * 4 + q];
        sum += v[q];
    }
    const unsigned inclusive = warp_inclusive_sum(sum);
    unsigned run = inclusive - sum;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        counts[lane_id() * 4 + q] = run;
        run += v[q];
    }
    return inclusive;
}

// Block-wide exclusive sum of one value per thread (every thread of the block must call it).
// scratch: __shared__ T[32]. *total gets the block's sum (in every thread).
template <int kThreads, class T>
__device__ __forceinline__ T block_exclusive_sum(T value, T* scratch, T* total) {
    constexpr int kWarps = kThreads / 32;
    const T inclusive = warp_inclusive_sum(value);
    if (lane_id() == 31) scratch[warp_id()] = inclusive;
    __syncthreads();
    if (warp_id() == 0) {
        T w = lane_id() < kWarps ? scratch[lane_id()] : T(0);
        w = warp_inclusive_sum(w);
        if (lane_id() < kWarps) scratch[lane_id()] = w;
    }
    __syncthreads();
    const T before = warp_id() == 0 ? T(0) : scratch[warp_id() - 1];
    *total = scratch[kWarps - 1];
    __syncthreads();  // scratch is free again
    return before + inclusive - value;
}

// Block-wide sum, max and min, the result in every thread. scratch: __shared__ T[32].
template <int kThreads, class T, class Op>
__device__ __forceinline__ T block_reduce(T value, T* scratch, Op op) {
    constexpr int kWarps = kThreads / 32;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(kFullMask, value, offset));
    if (lane_id() == 0) scratch[warp_id()] = value;
    __syncthreads();
    T r = scratch[0];
    for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
    __syncthreads();
    return r;
}
struct Sum {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// Flags published with release and read with acquire: the values written before a flag are
// seen by whoever sees the flag.
__device__ __forceinline__ void store_release(unsigned* p, unsigned v) {
#if defined(PYUNLEARN_CUDA_EMULATE)
    *p = v;
#else
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
#endif
}
__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
#if defined(PYUNLEARN_CUDA_EMULATE)
    return *p;
#else
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
#endif
}
__device__ __forceinline__ unsigned long long load_relaxed(const unsigned long long* p) {
#if defined(PYUNLEARN_CUDA_EMULATE)
    return *p;
#else
    unsigned long long v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
#endif
}
__device__ __forceinline__ void spin_pause() {
#if defined(PYUNLEARN_CUDA_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700)
    __nanosleep(64);
#endif
}

// Decoupled look-back (Merrill & Garland): tiles of one segment, numbered in the order blocks
// took them from an atomic counter, publish their N counts (flag 1) and then their inclusive
// prefix (flag 2); a tile adds up its predecessors' counts until it meets a prefix. A tile's
// predecessor was taken by a block already running, so the wait always ends. Flags start at 0.
template <int N>
struct LookBack {
    unsigned* flag;              // [tiles]
    unsigned long long* counts;  // [tiles × N]: the tile's own counts
    unsigned long long* prefix;  // [tiles × N]: its inclusive prefix within the segment
};

// Called by one thread. Returns the exclusive prefix of `tile` within its segment (whose first
// tile is `first`) and publishes the tile's inclusive prefix.
template <int N>
__device__ void look_back(LookBack<N> lb, unsigned tile, unsigned first, const unsigned long long (&own)[N],
                          unsigned long long (&exclusive)[N]) {
#pragma unroll
    for (int q = 0; q < N; ++q) exclusive[q] = 0;
    if (tile != first) {
#pragma unroll
        for (int q = 0; q < N; ++q) lb.counts[size_t(tile) * N + q] = own[q];
        store_release(&lb.flag[tile], 1u);
        unsigned j = tile - 1;
        for (;;) {
            unsigned f;
            while ((f = load_acquire(&lb.flag[j])) == 0u) spin_pause();
            const unsigned long long* from = f == 2u ? lb.prefix : lb.counts;
#pragma unroll
            for (int q = 0; q < N; ++q) exclusive[q] += load_relaxed(&from[size_t(j) * N + q]);
            if (f == 2u) break;
            --j;  // never passes `first`: the first tile publishes its prefix without waiting
        }
    }
#pragma unroll
    for (int q = 0; q < N; ++q) lb.prefix[size_t(tile) * N + q] = exclusive[q] + own[q];
    store_release(&lb.flag[tile], 2u);
}

}  // namespace cuda
}  // namespace pyunlearn
