// prune_topk on the GPU: the whole model in one launch sequence, exact top-k by |Δ| per layer.
//
// Every kernel covers all layers at once through a segment table (layer → its tiles); nothing
// loops over layers on the host. The sequence, all on the caller's stream:
//   sample   one block per layer: |Δ| at up to 8192 scrambled positions gives a floor that the
//            k-th largest |Δ| almost surely reaches (only speed depends on it).
//   collect  one pass over the model: Δ = after − before, the largest |Δ| of each layer (also its
//            finiteness), and every entry with |Δ| >= floor appended, in index order, to the
//            layer's "superset" (decoupled look-back keeps the order in one pass).
//   plan     per layer: the superset holds at least k entries and fits → select from it;
//            otherwise (the sample misled, or a mass of ties) → select from the whole layer.
//            Also the float16 scale, the non-finite status, and the list of tiles to work on.
//   hist/pick ×3  a radix select on the 31 key bits of |Δ| (12 + 12 + 7): histogram the keys
//            still in play, keep the bucket that holds the k-th largest. Gives the threshold t
//            and how many entries equal to t are taken (ties go to the lower index).
//   emit     entries above t, and the first `ties` equal to t, written in index order (look-back
//            again, counting both), as absolute indices and encoded values.
//   gaps     absolute indices → gaps.
//   refresh  before := after, only if the status says every layer is finite.
// Nothing is sorted, Δ is never stored whole, and the host never waits unless asked to.
#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "device.cuh"
#include "kernels.h"

namespace pyunlearn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 16;
constexpr unsigned kTile = kThreads * kItems;  // entries per tile
constexpr int kSampleMax = 8192;
constexpr int kBins = 4096;
// The radix levels: key bits [30:19], [18:7], [6:0].
__host__ __device__ constexpr int level_shift(int level) { return level == 0 ? 19 : level == 1 ? 7 : 0; }
__host__ __device__ constexpr int level_bits(int level) { return level == 2 ? 7 : 12; }
constexpr int kCounters = 8;  // atomic tile counters: collect, hist ×3, emit

enum Path : unsigned { kNone = 0, kSuperset = 1, kFull = 2 };

// One layer, as the host knows it.
struct Seg {
    const float* after;
    float* before;
    unsigned long long numel, k;
    unsigned long long out_offset;  // first entry of the layer in the output row
    unsigned long long cap;         // superset capacity
    unsigned long long sup_offset;  // first superset slot
    unsigned long long pad;
};

// One layer, as the kernels work it out.
struct State {
    unsigned max_key;  // largest |Δ| key (>= kNonFiniteKey: NaN or Inf)
    unsigned floor;    // the sampled floor
    unsigned path;
    unsigned prefix;   // key bits chosen so far; after the last level, the threshold t
    unsigned pad0, pad1;
    unsigned long long sup_count;  // entries with key >= floor
    unsigned long long src_count;  // entries selection works on (superset or whole layer)
    unsigned long long need;       // entries still to take from the keys matching prefix; finally: ties
    unsigned long long pad2;
    float scale, inverse;
};

// The tables that depend only on the arguments: uploaded once per distinct call (cached).
struct Tables {
    std::vector<char> bytes;
    size_t segs = 0, main_begin = 0, out_begin = 0;
};

struct Layout {
    size_t tables = 0, state = 0, hist = 0, counters = 0, flag1 = 0, flag2 = 0, zero_end = 0;
    size_t status = 0, work_begin = 0, counts1 = 0, prefix1 = 0, counts2 = 0, prefix2 = 0;
    size_t sup_idx = 0, sup_delta = 0, abs_idx = 0, total = 0;
    unsigned main_tiles = 0;
    unsigned long long total_k = 0, total_cap = 0;
};

unsigned long long ceil_div(unsigned long long a, unsigned long long b) { return (a + b - 1) / b; }

// Superset capacity: the sample aims at ~1.1–1.5 k entries; past 2k + 8192 the layer is
// selected from whole instead. Small layers fit whole.
unsigned long long superset_cap(unsigned long long n, unsigned long long k) {
    return k == 0 ? 0 : std::min(n, 2 * k + 8192);
}

Tables table_layout(size_t L) {
    Tables t;
    Carve c;
    t.segs = c.take(L * sizeof(Seg));
    t.main_begin = c.take((L + 1) * sizeof(unsigned));
    t.out_begin = c.take((L + 1) * sizeof(unsigned long long));
    t.bytes.resize(c.offset);
    return t;
}

Tables build_tables(const std::vector<PruneLayer>& layers) {
    const size_t L = layers.size();
    Tables t = table_layout(L);
    std::fill(t.bytes.begin(), t.bytes.end(), 0);
    auto* segs = reinterpret_cast<Seg*>(t.bytes.data() + t.segs);
    auto* main_begin = reinterpret_cast<unsigned*>(t.bytes.data() + t.main_begin);
    auto* out_begin = reinterpret_cast<unsigned long long*>(t.bytes.data() + t.out_begin);
    unsigned long long out = 0, sup = 0, tiles = 0;
    for (size_t i = 0; i < L; ++i) {
        const PruneLayer& l = layers[i];
        const unsigned long long cap = superset_cap(l.numel, l.k);
        segs[i] = Seg{l.after, l.before, l.numel, l.k, out, cap, sup, 0};
        main_begin[i] = static_cast<unsigned>(tiles);
        out_begin[i] = out;
        out += l.k;
        sup += cap;
        tiles += ceil_div(l.numel, kTile);
    }
    if (tiles >= (1ull << 31)) throw std::invalid_argument("too many elements for one call (2^31 tiles of 4096)");
    main_begin[L] = static_cast<unsigned>(tiles);
    out_begin[L] = out;
    return t;
}

Layout layout_for(const std::vector<PruneLayer>& layers) {
    const size_t L = layers.size();
    Layout w;
    for (const auto& l : layers) {
        w.main_tiles += static_cast<unsigned>(ceil_div(l.numel, kTile));
        w.total_k += l.k;
        w.total_cap += superset_cap(l.numel, l.k);
    }
    const size_t T = w.main_tiles;
    Carve c;
    w.tables = c.take(table_layout(L).bytes.size());
    // zeroed together
    w.state = c.take(L * sizeof(State));
    w.hist = c.take(L * kBins * sizeof(unsigned));
    w.counters = c.take(kCounters * sizeof(unsigned));
    w.flag1 = c.take(T * sizeof(unsigned));
    w.flag2 = c.take(T * sizeof(unsigned));
    w.zero_end = c.offset;
    w.status = c.take(sizeof(unsigned long long));  // set to all ones: -1
    w.work_begin = c.take((L + 1) * sizeof(unsigned));
    w.counts1 = c.take(T * sizeof(unsigned long long));
    w.prefix1 = c.take(T * sizeof(unsigned long long));
    w.counts2 = c.take(T * 2 * sizeof(unsigned long long));
    w.prefix2 = c.take(T * 2 * sizeof(unsigned long long));
    w.sup_idx = c.take(w.total_cap * sizeof(uint32_t));
    w.sup_delta = c.take(w.total_cap * sizeof(float));
    w.abs_idx = c.take(w.total_k * sizeof(uint32_t));
    w.total = c.offset;
    return w;
}

// Device copies of the tables, one per distinct argument set and device: the recorder prunes the
// same tensors every step, and a per-call upload from pageable memory may wait for the stream.
// Bounded; past the bound the tables travel in the workspace instead.
class TableCache {
public:
    const char* find_or_add(int device, const std::vector<char>& bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const Entry& e : entries_)
            if (e.device == device && e.bytes == bytes) return e.ptr;
        if (entries_.size() >= kMaxEntries) return nullptr;
        void* p = nullptr;
        check(cudaMalloc(&p, bytes.size()), "cudaMalloc (tables)");
        check(cudaMemcpy(p, bytes.data(), bytes.size(), cudaMemcpyHostToDevice), "cudaMemcpy (tables)");
        entries_.push_back({device, bytes, static_cast<char*>(p)});
        return static_cast<char*>(p);
    }

private:
    static constexpr size_t kMaxEntries = 64;
    struct Entry {
        int device;
        std::vector<char> bytes;
        char* ptr;
    };
    std::mutex mutex_;
    std::vector<Entry> entries_;
};

TableCache& table_cache() {
    static TableCache* cache = new TableCache;  // never destroyed: no CUDA calls at exit
    return *cache;
}

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {  // csrc/cpu/prune.cpp's
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// ---- sample: one block per layer -------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) sample_kernel(const Seg* segs, State* state) {
    __shared__ uint32_t keys[kSampleMax];
    __shared__ unsigned count;
    __shared__ unsigned scratch[32];
    const Seg s = segs[blockIdx.x];
    const unsigned long long n = s.numel, k = s.k;
    unsigned floor = 0;
    const unsigned long long wanted = min_of<unsigned long long>(n / 8, kSampleMax);
    if (k == 0) {
        floor = 0xffffffffu;  // nothing is collected; the pass still checks finiteness
    } else if (k < n && wanted >= 256) {  // else floor 0: take the whole layer
        if (threadIdx.x == 0) count = 0;
        __syncthreads();
        const unsigned long long groups = wanted / 16;
        for (unsigned long long g = threadIdx.x; g < groups; g += kThreads) {
            unsigned long long start = g * n / groups;
            const long long room = static_cast<long long>((g + 1) * n / groups) - static_cast<long long>(start) - 16;
            if (room > 0) start += mix64(g) % static_cast<unsigned long long>(room);
            const unsigned long long end = min_of(n, start + 16);
            for (unsigned long long e = start; e < end; ++e) {
                const uint32_t key = abs_key(__fsub_rn(s.after[e], s.before[e]));
                if (key < kNonFiniteKey) keys[atomicAdd(&count, 1u)] = key;
            }
        }
        __syncthreads();
        const unsigned m = count;
        const double expected = static_cast<double>(k) * m / static_cast<double>(n);
        const unsigned long long rank = static_cast<unsigned long long>(expected + 4.0 * sqrt(expected) + 4.0);
        if (rank < m) {
            // The (rank + 1)-th largest key, bit by bit from the top.
            uint32_t t = 0;
            for (int bit = 30; bit >= 0; --bit) {
                const uint32_t candidate = t | (1u << bit);
                unsigned c = 0;
                for (unsigned j = threadIdx.x; j < m; j += kThreads) c += keys[j] >= candidate;
                c = block_reduce<kThreads>(c, scratch, Sum());
                if (c >= rank + 1) t = candidate;
            }
            floor = t;
        }
    }
    if (threadIdx.x == 0) state[blockIdx.x].floor = floor;
}

// ---- collect: one pass over every layer --------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
collect_kernel(const Seg* segs, const unsigned* main_begin, int L, State* state, unsigned* counter, LookBack<1> lb,
               uint32_t* sup_idx, float* sup_delta) {
    __shared__ unsigned s_tile;
    __shared__ unsigned s_offset[kItems * kWarps];
    __shared__ unsigned s_warp_max[kWarps];
    __shared__ unsigned long long s_base;
    if (threadIdx.x == 0) s_tile = atomicAdd(counter, 1u);
    __syncthreads();
    const unsigned tile = s_tile;
    const int i = find_segment(main_begin, L, tile);
    const Seg s = segs[i];
    const unsigned first_tile = main_begin[i];
    const unsigned long long lo = static_cast<unsigned long long>(tile - first_tile) * kTile;
    const uint32_t floor = state[i].floor;

    float d[kItems];
    float b[kItems];
#pragma unroll
    for (int r = 0; r < kItems; ++r) {  // all loads first: 32 in flight per thread
        const unsigned long long e = lo + r * kThreads + threadIdx.x;
        d[r] = e < s.numel ? s.after[e] : 0.0f;
        b[r] = e < s.numel ? s.before[e] : 0.0f;
    }
    unsigned ballot[kItems];
    uint32_t mx = 0;
#pragma unroll
    for (int r = 0; r < kItems; ++r) {
        const bool valid = lo + r * kThreads + threadIdx.x < s.numel;
        d[r] = __fsub_rn(d[r], b[r]);
        const uint32_t key = abs_key(d[r]);
        if (valid && key > mx) mx = key;
        ballot[r] = __ballot_sync(kFullMask, valid && key >= floor);
    }
    if (lane_id() == 0) {
#pragma unroll
        for (int r = 0; r < kItems; ++r) s_offset[r * kWarps + warp_id()] = __popc(ballot[r]);
    }
    mx = block_reduce<kThreads>(mx, s_warp_max, Max());  // (its barriers also publish s_offset)
    if (warp_id() == 0) {
        // Exclusive offsets of the (item, warp) groups, in index order: 4 per lane.
        const unsigned inclusive = warp_exclusive_scan4(s_offset);
        const unsigned total = __shfl_sync(kFullMask, inclusive, 31);
        if (lane_id() == 0) {
            if (mx > 0) atomicMax(&state[i].max_key, mx);
            const unsigned long long own[1] = {total};
            unsigned long long exclusive[1];
            look_back(lb, tile, first_tile, own, exclusive);
            s_base = exclusive[0];
            if (total > 0) atomicAdd(&state[i].sup_count, static_cast<unsigned long long>(total));
        }
    }
    __syncthreads();
    const unsigned long long base = s_base;
#pragma unroll
    for (int r = 0; r < kItems; ++r) {
        if (!((ballot[r] >> lane_id()) & 1u)) continue;
        const unsigned long long pos = base + s_offset[r * kWarps + warp_id()] + __popc(ballot[r] & lanemask_lt());
        if (pos < s.cap) {  // past the capacity the layer is selected from whole (see plan)
            sup_idx[s.sup_offset + pos] = static_cast<uint32_t>(lo + r * kThreads + threadIdx.x);
            sup_delta[s.sup_offset + pos] = d[r];
        }
    }
}

// ---- plan: one block ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
plan_kernel(const Seg* segs, int L, State* state, unsigned* work_begin, unsigned long long* status, float* scales,
            int fp16) {
    __shared__ unsigned scratch[32];
    unsigned carry = 0;
    for (int base = 0; base < L; base += kThreads) {
        const int i = base + static_cast<int>(threadIdx.x);
        unsigned tiles = 0;
        if (i < L) {
            const Seg s = segs[i];
            State& st = state[i];
            const uint32_t mk = st.max_key;
            unsigned path = kNone;
            unsigned long long src = 0;
            if (mk >= kNonFiniteKey) {
                atomicMin(status, static_cast<unsigned long long>(i));
            } else if (s.k > 0) {
                const unsigned long long sup = st.sup_count;
                if (sup >= s.k && sup <= s.cap) {
                    path = kSuperset;
                    src = sup;
                } else {
                    path = kFull;
                    src = s.numel;
                }
            }
            // csrc/common.h fp16_scale_for: 2^(ilogb(max) − 14), at least 2^-126; 1 for max 0
            // or k 0. Built from bits, so scale and 1/scale are exact powers of two.
            float scale = 1.0f, inverse = 1.0f;
            if (fp16 && s.k > 0 && mk > 0 && mk < kNonFiniteKey) {
                int e = static_cast<int>(mk >> 23) - 127 - 14;  // a subnormal max gives < -126
                if (e < -126) e = -126;
                scale = __uint_as_float(static_cast<uint32_t>(e + 127) << 23);
                inverse = __uint_as_float(static_cast<uint32_t>(127 - e) << 23);
            }
            scales[i] = scale;
            st.path = path;
            st.src_count = src;
            st.need = s.k;
            st.prefix = 0;
            st.scale = scale;
            st.inverse = inverse;
            tiles = static_cast<unsigned>((src + kTile - 1) / kTile);
        }
        unsigned total;
        const unsigned before = block_exclusive_sum<kThreads>(tiles, scratch, &total);
        if (i < L) work_begin[i] = carry + before;
        carry += total;
    }
    if (threadIdx.x == 0) work_begin[L] = carry;
}

// The selection source of a layer: its superset, or the whole layer.
struct Source {
    const Seg* s;
    unsigned path;
    const uint32_t* sup_idx;
    const float* sup_delta;
    __device__ __forceinline__ float delta(unsigned long long j) const {
        return path == kSuperset ? sup_delta[s->sup_offset + j] : __fsub_rn(s->after[j], s->before[j]);
    }
    __device__ __forceinline__ uint32_t index(unsigned long long j) const {
        return path == kSuperset ? sup_idx[s->sup_offset + j] : static_cast<uint32_t>(j);
    }
};

// ---- hist: persistent blocks over the work tiles -----------------------------------------------

template <int Level>
__global__ void __launch_bounds__(kThreads)
hist_kernel(const Seg* segs, const State* state, const unsigned* work_begin, int L, unsigned* counter,
            const uint32_t* sup_idx, const float* sup_delta, unsigned* global_hist) {
    constexpr int bins = 1 << level_bits(Level);
    __shared__ unsigned hist[bins];
    __shared__ unsigned s_tile;
    const unsigned total_tiles = work_begin[L];
    for (;;) {
        if (threadIdx.x == 0) s_tile = atomicAdd(counter, 1u);
        for (int b = threadIdx.x; b < bins; b += kThreads) hist[b] = 0;
        __syncthreads();
        const unsigned tile = s_tile;
        if (tile >= total_tiles) break;
        const int i = find_segment(work_begin, L, tile);
        const Seg s = segs[i];
        const State& st = state[i];
        const Source src{&s, st.path, sup_idx, sup_delta};
        const unsigned prefix = st.prefix;
        const unsigned long long lo = static_cast<unsigned long long>(tile - work_begin[i]) * kTile;
        const unsigned long long hi = min_of<unsigned long long>(lo + kTile, st.src_count);
        for (unsigned long long j = lo + threadIdx.x; j < hi; j += kThreads) {
            const uint32_t key = abs_key(src.delta(j));
            if (Level == 0) {
                atomicAdd(&hist[key >> level_shift(0)], 1u);
            } else if ((key >> level_shift(Level - 1)) == prefix) {
                atomicAdd(&hist[(key >> level_shift(Level)) & (bins - 1)], 1u);
            }
        }
        __syncthreads();
        for (int b = threadIdx.x; b < bins; b += kThreads)
            if (hist[b] != 0) atomicAdd(&global_hist[static_cast<size_t>(i) * kBins + b], hist[b]);
        __syncthreads();
    }
}

// ---- pick: one block per layer -----------------------------------------------------------------

template <int Level>
__global__ void __launch_bounds__(kThreads) pick_kernel(State* state, unsigned* global_hist) {
    constexpr int bins = 1 << level_bits(Level);
    constexpr int per = (bins + kThreads - 1) / kThreads;
    __shared__ unsigned long long scratch[32];
    State& st = state[blockIdx.x];
    if (st.path == kNone) return;  // the whole block
    const unsigned long long need = st.need;
    const unsigned prefix = st.prefix;
    unsigned* h = global_hist + static_cast<size_t>(blockIdx.x) * kBins;
    // Thread 0 holds the highest bins, so an exclusive sum over threads counts the keys above.
    const int hi = bins - static_cast<int>(threadIdx.x) * per;
    const int lo = hi - per > 0 ? hi - per : 0;
    unsigned long long sum = 0;
    for (int b = lo; b < hi; ++b) sum += h[b];
    unsigned long long total;
    const unsigned long long above = block_exclusive_sum<kThreads>(sum, scratch, &total);
    if (above < need && need <= above + sum) {  // exactly one thread: the k-th largest is here
        unsigned long long acc = above;
        for (int b = hi - 1; b >= lo; --b) {
            const unsigned c = h[b];
            if (acc + c >= need) {
                st.prefix = Level == 0 ? static_cast<unsigned>(b) : (prefix << level_bits(Level)) | static_cast<unsigned>(b);
                st.need = need - acc;  // after the last level: how many keys equal to t to take
                break;
            }
            acc += c;
        }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < bins; b += kThreads) h[b] = 0;  // clean for the next level
}

// ---- emit: persistent blocks over the work tiles, in index order --------------------------------

__global__ void __launch_bounds__(kThreads)
emit_kernel(const Seg* segs, const State* state, const unsigned* work_begin, int L, unsigned* counter, LookBack<2> lb,
            const uint32_t* sup_idx, const float* sup_delta, uint32_t* abs_idx, void* values, int fp16) {
    __shared__ unsigned s_tile;
    __shared__ unsigned s_offset[2][kItems * kWarps];
    __shared__ unsigned s_total[2];
    __shared__ unsigned long long s_base[2];
    const unsigned total_tiles = work_begin[L];
    for (;;) {
        if (threadIdx.x == 0) s_tile = atomicAdd(counter, 1u);
        __syncthreads();
        const unsigned tile = s_tile;
        if (tile >= total_tiles) break;
        const int i = find_segment(work_begin, L, tile);
        const Seg s = segs[i];
        const State& st = state[i];
        const Source src{&s, st.path, sup_idx, sup_delta};
        const unsigned first_tile = work_begin[i];
        const unsigned threshold = st.prefix;
        const unsigned long long ties = st.need, count = st.src_count;
        const float inverse = st.inverse;
        const unsigned long long lo = static_cast<unsigned long long>(tile - first_tile) * kTile;

        float d[kItems];
        uint32_t idx[kItems];
#pragma unroll
        for (int r = 0; r < kItems; ++r) {
            const unsigned long long j = lo + r * kThreads + threadIdx.x;
            d[r] = j < count ? src.delta(j) : 0.0f;
            idx[r] = j < count ? src.index(j) : 0u;
        }
        unsigned above[kItems], equal[kItems];
#pragma unroll
        for (int r = 0; r < kItems; ++r) {
            const bool valid = lo + r * kThreads + threadIdx.x < count;
            const uint32_t key = abs_key(d[r]);
            above[r] = __ballot_sync(kFullMask, valid && key > threshold);
            equal[r] = __ballot_sync(kFullMask, valid && key == threshold);
        }
        if (lane_id() == 0) {
#pragma unroll
            for (int r = 0; r < kItems; ++r) {
                s_offset[0][r * kWarps + warp_id()] = __popc(above[r]);
                s_offset[1][r * kWarps + warp_id()] = __popc(equal[r]);
            }
        }
        __syncthreads();
        if (warp_id() < 2) {  // warp 0 scans the counts above t, warp 1 those equal to t
            const unsigned inclusive = warp_exclusive_scan4(s_offset[warp_id()]);
            if (lane_id() == 31) s_total[warp_id()] = inclusive;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            const unsigned long long own[2] = {s_total[0], s_total[1]};
            unsigned long long exclusive[2];
            look_back(lb, tile, first_tile, own, exclusive);
            s_base[0] = exclusive[0];
            s_base[1] = exclusive[1];
        }
        __syncthreads();
        const unsigned long long base_above = s_base[0], base_equal = s_base[1];
#pragma unroll
        for (int r = 0; r < kItems; ++r) {
            const unsigned bit = 1u << lane_id();
            const bool is_above = above[r] & bit, is_equal = equal[r] & bit;
            if (!is_above && !is_equal) continue;
            const unsigned long long n_above = base_above + s_offset[0][r * kWarps + warp_id()] + __popc(above[r] & lanemask_lt());
            const unsigned long long n_equal = base_equal + s_offset[1][r * kWarps + warp_id()] + __popc(equal[r] & lanemask_lt());
            if (is_equal && n_equal >= ties) continue;  // ties go to the lower index
            const unsigned long long out = s.out_offset + n_above + (n_equal < ties ? n_equal : ties);
            abs_idx[out] = idx[r];
            if (fp16) {
                // Δ · (1/scale) is Δ / scale exactly (a power of two); then round to nearest even.
                static_cast<__half*>(values)[out] = __float2half_rn(__fmul_rn(d[r], inverse));
            } else {
                static_cast<float*>(values)[out] = d[r];
            }
        }
        __syncthreads();  // shared memory is reused by the next tile
    }
}

// ---- gaps and refresh --------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
gap_kernel(const unsigned long long* out_begin, int L, unsigned long long total_k, const uint32_t* abs_idx,
           uint32_t* index) {
    const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * kThreads;
    for (unsigned long long j = static_cast<unsigned long long>(blockIdx.x) * kThreads + threadIdx.x; j < total_k; j += stride) {
        const int i = find_segment(out_begin, L, j);
        const uint32_t previous = j == out_begin[i] ? 0xffffffffu : abs_idx[j - 1];  // −1 before a layer's first
        index[j] = abs_idx[j] - previous;
    }
}

__global__ void __launch_bounds__(kThreads)
refresh_kernel(const Seg* segs, const unsigned* main_begin, int L, const unsigned long long* status) {
    if (*status != ~0ull) return;  // a layer is not finite: `before` stays as it was
    const unsigned tile = blockIdx.x;
    const int i = find_segment(main_begin, L, tile);
    const Seg s = segs[i];
    const unsigned long long lo = static_cast<unsigned long long>(tile - main_begin[i]) * kTile;
    const unsigned count = static_cast<unsigned>(min_of<unsigned long long>(kTile, s.numel - lo));
    const float* from = s.after + lo;
    float* to = s.before + lo;
    if ((reinterpret_cast<uintptr_t>(from) | reinterpret_cast<uintptr_t>(to)) % 16 == 0) {
        const unsigned vectors = count / 4;
        for (unsigned q = threadIdx.x; q < vectors; q += kThreads)
            reinterpret_cast<float4*>(to)[q] = reinterpret_cast<const float4*>(from)[q];
        for (unsigned q = vectors * 4 + threadIdx.x; q < count; q += kThreads) to[q] = from[q];
    } else {
        for (unsigned q = threadIdx.x; q < count; q += kThreads) to[q] = from[q];
    }
}

}  // namespace

size_t prune_workspace_bytes(const std::vector<PruneLayer>& layers) { return layout_for(layers).total; }

int64_t prune_topk_cuda(const std::vector<PruneLayer>& layers, const PruneOutput& out, bool refresh,
                        int64_t* status_device, bool wait, void* workspace, size_t workspace_bytes, void* stream_handle) {
    const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    const int L = static_cast<int>(layers.size());
    if (L == 0) {
        if (status_device) check(cudaMemsetAsync(status_device, 0xff, sizeof(int64_t), stream), "cudaMemsetAsync");
        return wait ? -1 : -2;
    }
    const Layout w = layout_for(layers);
    const Tables tables = build_tables(layers);
    Workspace ws(workspace, workspace_bytes, w.total, stream);

    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    const char* table_base = table_cache().find_or_add(device, tables.bytes);
    if (table_base == nullptr) {
        check(cudaMemcpyAsync(ws.at<char>(w.tables), tables.bytes.data(), tables.bytes.size(), cudaMemcpyHostToDevice,
                              stream),
              "cudaMemcpyAsync (tables)");
        table_base = ws.at<char>(w.tables);
    }
    const Seg* segs = reinterpret_cast<const Seg*>(table_base + tables.segs);
    const unsigned* main_begin = reinterpret_cast<const unsigned*>(table_base + tables.main_begin);
    const unsigned long long* out_begin = reinterpret_cast<const unsigned long long*>(table_base + tables.out_begin);

    State* state = ws.at<State>(w.state);
    unsigned* hist = ws.at<unsigned>(w.hist);
    unsigned* counters = ws.at<unsigned>(w.counters);
    unsigned long long* status = ws.at<unsigned long long>(w.status);
    unsigned* work_begin = ws.at<unsigned>(w.work_begin);
    uint32_t* sup_idx = ws.at<uint32_t>(w.sup_idx);
    float* sup_delta = ws.at<float>(w.sup_delta);
    uint32_t* abs_idx = ws.at<uint32_t>(w.abs_idx);
    const LookBack<1> lb1{ws.at<unsigned>(w.flag1), ws.at<unsigned long long>(w.counts1), ws.at<unsigned long long>(w.prefix1)};
    const LookBack<2> lb2{ws.at<unsigned>(w.flag2), ws.at<unsigned long long>(w.counts2), ws.at<unsigned long long>(w.prefix2)};
    const int fp16 = out.encoding == Encoding::Float16;

    check(cudaMemsetAsync(ws.at<char>(w.state), 0, w.zero_end - w.state, stream), "cudaMemsetAsync");
    check(cudaMemsetAsync(status, 0xff, sizeof(unsigned long long), stream), "cudaMemsetAsync");

    const unsigned persistent = std::max(1u, std::min(w.main_tiles, static_cast<unsigned>(multiprocessors()) * 4));
    launch("sample", sample_kernel, L, kThreads, stream, segs, state);
    launch("collect", collect_kernel, w.main_tiles, kThreads, stream, segs, main_begin, L, state, counters + 0, lb1,
           sup_idx, sup_delta);
    launch("plan", plan_kernel, 1, kThreads, stream, segs, L, state, work_begin, status, out.scales, fp16);
    if (w.total_k > 0) {
        launch("hist0", hist_kernel<0>, persistent, kThreads, stream, segs, state,
               work_begin, L, counters + 1, sup_idx,
               sup_delta, hist);
        launch("pick0", pick_kernel<0>, L, kThreads, stream, state, hist);
        launch("hist1", hist_kernel<1>, persistent, kThreads, stream, segs, state,
               work_begin, L, counters + 2, sup_idx,
               sup_delta, hist);
        launch("pick1", pick_kernel<1>, L, kThreads, stream, state, hist);
        launch("hist2", hist_kernel<2>, persistent, kThreads, stream, segs, state,
               work_begin, L, counters + 3, sup_idx,
               sup_delta, hist);
        launch("pick2", pick_kernel<2>, L, kThreads, stream, state, hist);
        launch("emit", emit_kernel, persistent, kThreads, stream, segs, state,
               work_begin, L, counters + 4, lb2, sup_idx,
               sup_delta, abs_idx, out.values, fp16);
        const unsigned gap_blocks = static_cast<unsigned>(std::min<unsigned long long>(ceil_div(w.total_k, kThreads * 4), 65535));
        launch("gaps", gap_kernel, gap_blocks, kThreads, stream, out_begin, L, w.total_k,
               abs_idx, out.index);
    }
    if (refresh)
        launch("refresh", refresh_kernel, w.main_tiles, kThreads, stream, segs, main_begin, L,
               status);
    if (status_device)
        check(cudaMemcpyAsync(status_device, status, sizeof(int64_t), cudaMemcpyDeviceToDevice, stream),
              "cudaMemcpyAsync (status)");
    if (!wait) return -2;
    int64_t result = 0;
    check(cudaMemcpyAsync(&result, status, sizeof result, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync (status)");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    return result;
}

}  // namespace cuda
}  // namespace pyunlearn
