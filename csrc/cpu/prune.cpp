// Fused layer-wise top-k of |after − before| for a whole model in one call.
//
// Per layer, a deterministic sample of |Δ| gives a bound `floor` that the k-th largest |Δ|
// almost surely exceeds. One streaming pass then computes Δ block by block (vectorised),
// notes the largest |Δ| (which also tells whether the layer is finite), and appends every
// entry with |Δ| >= floor to a "superset" in index order. The exact threshold is found on
// that superset alone (about 1.3·k entries, via a histogram over its key range), and the
// selected entries are emitted from it. Δ of the whole layer is never stored or re-read, and
// nothing is sorted. Should the sample mislead (fewer than k entries reach the floor), the
// pass is simply rerun with floor 0: `before` is still untouched then, because the snapshot
// refresh (before := after) runs only once every layer has been found finite.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "../prune.h"

namespace pyunlearn {
namespace {

std::atomic<int64_t> g_small_layer_limit{int64_t{1} << 15};
std::atomic<int64_t> g_serial_below{int64_t{1} << 16};  // models smaller than this run on one thread

constexpr int64_t kBlock = 2048;         // Δ of one block (8 KB) is filtered while still in L1
constexpr int64_t kSampleGroup = 16;     // contiguous sample entries: one cache line of each input
constexpr int kRangeBits = 12;           // histogram of superset keys: 4096 buckets, 16 KB
constexpr int64_t kSmallSuperset = 4096; // below this, the threshold is found by selection
constexpr int64_t kCopySpan = int64_t{1} << 18;  // refresh copies this many floats per task

// Per-layer scratch, reused across calls: page-faulting fresh buffers of a large model every
// optimizer step would cost more than the selection itself.
struct Scratch {
    std::vector<uint32_t> sup_index;   // the superset, part t at region(t)
    std::vector<float> sup_delta;
    std::vector<uint32_t> hist;        // one range histogram per part
    std::vector<uint32_t> sample;
};

class ScratchPool {
public:
    std::unique_ptr<Scratch> take() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (free_.empty()) return std::make_unique<Scratch>();
        auto ws = std::move(free_.back());
        free_.pop_back();
        return ws;
    }
    void give(std::unique_ptr<Scratch> ws) {
        std::lock_guard<std::mutex> lock(mutex_);
        free_.push_back(std::move(ws));
    }

private:
    std::mutex mutex_;  // the kernel runs without the GIL: two Python threads may call it at once
    std::vector<std::unique_ptr<Scratch>> free_;
};

ScratchPool& pool() {
    static ScratchPool p;
    return p;
}

// Runs fn(part) for every part: on all threads when there are several parts, inline otherwise
// (small layers run one per thread inside an outer parallel loop).
template <class Fn>
void for_each_part(int parts, Fn&& fn) {
    if (parts == 1) {
        fn(0);
        return;
    }
#pragma omp parallel for schedule(static, 1) num_threads(parts)
    for (int t = 0; t < parts; ++t) fn(t);
}

uint64_t mix64(uint64_t x) {  // splitmix64: a fixed, seedless scramble for sample positions
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// d = a − b; returns the largest |d| as a key.
PU_HOT uint32_t diff_max_key(const float* a, const float* b, float* d, int64_t n) {
    uint32_t mx = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float x = a[i] - b[i];
        d[i] = x;
        const uint32_t key = abs_key(x);
        mx = key > mx ? key : mx;
    }
    return mx;
}

// A key that at least k entries of the layer reach, with high probability (4 standard
// deviations of the sample count), from up to 4k entries taken in groups of 16 at scrambled
// positions (so periodic weight layouts cannot alias with the sampling). Only speed depends
// on it: the caller checks the count and falls back to 0. A larger sample would tighten the
// superset, but its cache misses are serial and cost more than the superset saves.
uint32_t sampled_floor(const PruneLayer& layer, std::vector<uint32_t>& sample) {
    const int64_t n = layer.numel, k = layer.k;
    // At most an eighth of the layer: on a small layer a larger sample costs more to select
    // from than the superset it saves (a looser floor just means a larger superset).
    const int64_t wanted = std::min(n / 8, std::clamp<int64_t>(64 * n / k, 1024, 4096));
    if (wanted < 256) return 0;  // too small to sample: select from the whole layer
    const int64_t groups = std::max<int64_t>(1, wanted / kSampleGroup);
    sample.clear();
    for (int64_t g = 0; g < groups; ++g) {
        int64_t start = g * n / groups;
        const int64_t room = (g + 1) * n / groups - start - kSampleGroup;
        if (room > 0) start += static_cast<int64_t>(mix64(g) % static_cast<uint64_t>(room));
        const int64_t end = std::min(n, start + kSampleGroup);
        for (int64_t i = start; i < end; ++i) {
            const uint32_t key = abs_key(layer.after[i] - layer.before[i]);
            if (key < kNonFiniteKey) sample.push_back(key);
        }
    }
    const int64_t m = static_cast<int64_t>(sample.size());
    const double expected = static_cast<double>(k) * m / n;  // sample entries in the top k
    const int64_t rank = static_cast<int64_t>(expected + 4.0 * std::sqrt(expected) + 4.0);
    if (rank >= m) return 0;
    std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<>());
    return sample[rank];
}

// Δ of a[lo, hi) − b[lo, hi); appends (index, Δ) of every entry with key >= floor to the
// superset, in index order. Returns the count; *max_key gets the largest key seen. The
// superset buffers need kSupersetSlack entries of room past the last one written.
constexpr int64_t kSupersetSlack = 16;

PU_HOT int64_t collect_superset_generic(const float* a, const float* b, int64_t lo, int64_t hi,
                                        uint32_t floor, uint32_t* sup_index, float* sup_delta,
                                        uint32_t* max_key) {
    int64_t count = 0;
    uint32_t mx = 0;
    float block[kBlock];
    for (int64_t s = lo; s < hi; s += kBlock) {
        const int64_t len = std::min(hi - s, kBlock);
        mx = std::max(mx, diff_max_key(a + s, b + s, block, len));
        for (int64_t j = 0; j < len; ++j) {
            if (abs_key(block[j]) < floor) continue;
            sup_index[count] = static_cast<uint32_t>(s + j);
            sup_delta[count++] = block[j];
        }
    }
    *max_key = mx;
    return count;
}

#if defined(__x86_64__)
// 16 entries at a time: compare all keys with the floor, compress the hits into the front of a
// register and store the whole register (the slack absorbs the rest), so no branch depends on
// the data. Compressing into a register, not memory: the memory form is microcoded and slow on
// some AMD cores.
__attribute__((target("avx512f"))) int64_t collect_superset_avx512(
    const float* a, const float* b, int64_t lo, int64_t hi, uint32_t floor, uint32_t* sup_index,
    float* sup_delta, uint32_t* max_key) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512i floor_v = _mm512_set1_epi32(static_cast<int>(floor));
    const __m512i sixteen = _mm512_set1_epi32(16);
    __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo)),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i mx = _mm512_setzero_si512();
    int64_t count = 0, i = lo;
    for (; i + 16 <= hi; i += 16) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
        const __m512i key = _mm512_and_si512(_mm512_castps_si512(d), abs_mask);
        mx = _mm512_max_epu32(mx, key);
        const __mmask16 hit = _mm512_cmpge_epu32_mask(key, floor_v);
        _mm512_storeu_si512(sup_index + count, _mm512_maskz_compress_epi32(hit, index));
        _mm512_storeu_ps(sup_delta + count, _mm512_maskz_compress_ps(hit, d));
        count += __builtin_popcount(hit);
        index = _mm512_add_epi32(index, sixteen);
    }
    uint32_t tail_max = 0;
    count += collect_superset_generic(a, b, i, hi, floor, sup_index + count, sup_delta + count, &tail_max);
    *max_key = std::max(_mm512_reduce_max_epu32(mx), tail_max);
    return count;
}
#endif

int64_t collect_superset(const float* a, const float* b, int64_t lo, int64_t hi, uint32_t floor,
                         uint32_t* sup_index, float* sup_delta, uint32_t* max_key) {
#if defined(__x86_64__)
    static const bool avx512 = __builtin_cpu_supports("avx512f");
    if (avx512) return collect_superset_avx512(a, b, lo, hi, floor, sup_index, sup_delta, max_key);
#endif
    return collect_superset_generic(a, b, lo, hi, floor, sup_index, sup_delta, max_key);
}

// Writes the superset entries whose key is above `threshold`, plus the first `ties` whose key
// equals it, in index order: indices and encoded values. Stops once `quota` entries are out
// (with many ties, long before the superset's end). Branch-free: at keep 0.1 most superset
// entries are taken, and a data-dependent branch would mispredict on every exception.
PU_HOT void emit_selected(const uint32_t* sup_index, const float* sup_delta, int64_t count,
                          uint32_t threshold, int64_t ties, int64_t quota, uint32_t* idx,
                          void* values, ValueEncoding enc, float scale) {
    // Δ · (1/scale) equals Δ / scale bit for bit: the scale is a power of two within float32's
    // normal range, so its reciprocal is exact and both round the same real number.
    const float inverse = 1.0f / scale;
    int64_t m = 0;
    for (int64_t j = 0; j < count && m < quota; ++j) {
        const float d = sup_delta[j];
        const uint32_t key = abs_key(d);
        const int64_t tie = key == threshold && ties > 0;
        const int64_t take = (key > threshold) | tie;
        ties -= tie;
        idx[m] = sup_index[j];
        if (enc == ValueEncoding::Float32) {
            static_cast<float*>(values)[m] = d;
        } else {
            static_cast<_Float16*>(values)[m] = static_cast<_Float16>(d * inverse);
        }
        m += take;
    }
}

// Absolute indices → gaps, in place. `prev` is the index emitted just before idx[0] (−1 for
// the first entry of a layer).
void gap_encode(uint32_t* idx, int64_t m, int64_t prev) {
    for (int64_t j = m - 1; j > 0; --j) idx[j] -= idx[j - 1];
    if (m > 0) idx[0] = static_cast<uint32_t>(static_cast<int64_t>(idx[0]) - prev);
}

void* value_slot(void* values, ValueEncoding enc, int64_t pos) {
    const size_t width = enc == ValueEncoding::Float32 ? 4 : 2;
    return static_cast<char*>(values) + pos * width;
}

struct LayerOut {
    uint32_t* idx;
    void* values;
    float* scale;
};

// The k-th largest key of the superset and, per part, how many of its keys lie above it
// (`greater`) and at it (`equal`). Two ways, picked by the superset's size:

// A small superset: copy its keys and select. (A 4096-bucket histogram would cost more than the
// whole layer on a small model.)
template <class Region>
uint32_t threshold_by_selection(Scratch& ws, int parts, const std::vector<int64_t>& count,
                                Region region, int64_t k, std::vector<int64_t>& greater,
                                std::vector<int64_t>& equal) {
    std::vector<uint32_t>& keys = ws.sample;  // the sample is no longer needed
    keys.clear();
    for (int t = 0; t < parts; ++t) {
        const float* d = ws.sup_delta.data() + region(t);
        for (int64_t j = 0; j < count[t]; ++j) keys.push_back(abs_key(d[j]));
    }
    std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<>());
    const uint32_t threshold = keys[k - 1];
    for (int t = 0; t < parts; ++t) {
        const float* d = ws.sup_delta.data() + region(t);
        for (int64_t j = 0; j < count[t]; ++j) {
            const uint32_t key = abs_key(d[j]);
            greater[t] += key > threshold;
            equal[t] += key == threshold;
        }
    }
    return threshold;
}

// A large superset: narrow a key range. Each round histograms the keys inside [range_lo,
// range_hi] into 4096 buckets (per part, in parallel) and keeps the bucket that holds the k-th
// largest; a bucket one key wide is the threshold. At most three rounds (31 key bits), and any
// number of ties costs nothing extra.
template <class Region>
uint32_t threshold_by_histogram(Scratch& ws, int parts, const std::vector<int64_t>& count,
                                Region region, int64_t k, uint32_t floor, uint32_t layer_max,
                                std::vector<int64_t>& greater, std::vector<int64_t>& equal) {
    const size_t buckets = size_t{1} << kRangeBits;
    uint32_t range_lo = floor, range_hi = layer_max;
    int64_t need = k;
    for (;;) {
        int shift = 0;
        while (((range_hi - range_lo) >> shift) >= (uint32_t{1} << kRangeBits)) ++shift;
        ws.hist.assign(buckets * parts, 0);
        for_each_part(parts, [&](int t) {
            uint32_t* hist = ws.hist.data() + buckets * t;
            const float* d = ws.sup_delta.data() + region(t);
            for (int64_t j = 0; j < count[t]; ++j) {
                const uint32_t key = abs_key(d[j]);
                if (key >= range_lo && key <= range_hi) ++hist[(key - range_lo) >> shift];
            }
        });
        auto in_bucket = [&](size_t b) {
            int64_t c = 0;
            for (int t = 0; t < parts; ++t) c += ws.hist[buckets * t + b];
            return c;
        };
        const size_t top = (range_hi - range_lo) >> shift;
        size_t bucket = top;
        int64_t above = 0;
        for (;; --bucket) {  // ends: the range holds >= need keys
            const int64_t c = in_bucket(bucket);
            if (above + c >= need) break;
            above += c;
        }
        for (int t = 0; t < parts; ++t)
            for (size_t b = bucket + 1; b <= top; ++b) greater[t] += ws.hist[buckets * t + b];
        need -= above;
        const uint32_t bucket_lo = range_lo + (static_cast<uint32_t>(bucket) << shift);
        if (shift == 0) {
            for (int t = 0; t < parts; ++t) equal[t] = ws.hist[buckets * t + bucket];
            return bucket_lo;
        }
        range_hi = std::min(range_hi, bucket_lo + ((uint32_t{1} << shift) - 1));
        range_lo = bucket_lo;
    }
}

// One layer, split into `parts` contiguous ranges (1 for a small layer on one thread).
// Returns false if its Δ holds NaN or Inf.
bool prune_layer(const PruneLayer& layer, int parts, Scratch& ws, const LayerOut& out,
                 ValueEncoding enc) {
    const int64_t n = layer.numel, k = layer.k;
    auto begin = [&](int t) { return n * t / parts; };
    auto region = [&](int t) { return begin(t) + kSupersetSlack * t; };  // part t's superset
    const size_t superset_size = static_cast<size_t>(n + kSupersetSlack * parts);
    if (ws.sup_index.size() < superset_size) {
        ws.sup_index.resize(superset_size);
        ws.sup_delta.resize(superset_size);
    }
    std::vector<int64_t> count(parts, 0);
    std::vector<uint32_t> max_key(parts, 0);
    auto collect = [&](uint32_t floor) {
        for_each_part(parts, [&](int t) {
            count[t] = collect_superset(layer.after, layer.before, begin(t), begin(t + 1), floor,
                                        ws.sup_index.data() + region(t), ws.sup_delta.data() + region(t),
                                        &max_key[t]);
        });
    };

    // k = 0 still needs the pass (for the finiteness check) but collects nothing.
    uint32_t floor = k == 0 ? UINT32_MAX : k == n ? 0 : sampled_floor(layer, ws.sample);
    collect(floor);
    const uint32_t layer_max = *std::max_element(max_key.begin(), max_key.end());
    if (layer_max >= kNonFiniteKey) return false;
    const float scale = enc == ValueEncoding::Float16 ? fp16_scale_for(k > 0 ? layer_max : 0) : 1.0f;
    *out.scale = scale;
    if (k == 0) return true;
    int64_t total = 0;
    for (int64_t c : count) total += c;
    if (total < k) {  // the sample misled us: take everything (still exact, just slower)
        floor = 0;
        collect(floor);
        total = 0;
        for (int64_t c : count) total += c;
    }

    std::vector<int64_t> greater(parts, 0), equal(parts, 0);
    const uint32_t threshold = total <= kSmallSuperset
        ? threshold_by_selection(ws, parts, count, region, k, greater, equal)
        : threshold_by_histogram(ws, parts, count, region, k, floor, layer_max, greater, equal);

    // Each part's share of the output: its keys above the threshold, and the ties it may take
    // (ties go to the lower index, so earlier parts take theirs first).
    std::vector<int64_t> ties(parts), start(parts + 1, 0);
    int64_t greater_total = 0;
    for (int64_t g : greater) greater_total += g;
    int64_t ties_left = k - greater_total;
    for (int t = 0; t < parts; ++t) {
        ties[t] = std::min(equal[t], ties_left);
        ties_left -= ties[t];
        start[t + 1] = start[t] + greater[t] + ties[t];
    }

    for_each_part(parts, [&](int t) {
        emit_selected(ws.sup_index.data() + region(t), ws.sup_delta.data() + region(t), count[t],
                      threshold, ties[t], start[t + 1] - start[t], out.idx + start[t],
                      value_slot(out.values, enc, start[t]), enc, scale);
    });
    std::vector<int64_t> prev(parts, -1);  // the index emitted just before each part's first
    for (int t = 1; t < parts; ++t) prev[t] = start[t] > 0 ? out.idx[start[t] - 1] : -1;
    for_each_part(parts, [&](int t) { gap_encode(out.idx + start[t], start[t + 1] - start[t], prev[t]); });
    return true;
}

// before := after for every layer, split by bytes.
void refresh_snapshot(const std::vector<PruneLayer>& layers, int threads) {
    struct Span {
        const float* src;
        float* dst;
        int64_t n;
    };
    std::vector<Span> spans;
    for (const auto& layer : layers)
        for (int64_t s = 0; s < layer.numel; s += kCopySpan)
            spans.push_back({layer.after + s, layer.before + s, std::min(kCopySpan, layer.numel - s)});
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t j = 0; j < static_cast<int64_t>(spans.size()); ++j)
        std::memcpy(spans[j].dst, spans[j].src, spans[j].n * sizeof(float));
}

}  // namespace

PruneTuning prune_tuning() { return {g_small_layer_limit.load(), g_serial_below.load()}; }
void set_prune_tuning(const PruneTuning& tuning) {
    g_small_layer_limit.store(tuning.small_layer_limit);
    g_serial_below.store(tuning.serial_below);
}

int64_t prune_topk_cpu(const std::vector<PruneLayer>& layers, const PruneOutput& out,
                       bool refresh, int threads) {
    const int64_t L = static_cast<int64_t>(layers.size());
    int64_t total = 0;
    for (const auto& layer : layers) total += layer.numel;
    // A small model is done before a second thread would even wake up (tens of microseconds,
    // measured on a 6k-parameter CNN): run it on the calling thread alone.
    const int T = total < g_serial_below.load() && threads <= 0 ? 1 : resolve_threads(threads);
    const int64_t small_limit = g_small_layer_limit.load();

    std::vector<int64_t> offset(L + 1, 0), small, large;
    for (int64_t i = 0; i < L; ++i) {
        offset[i + 1] = offset[i] + layers[i].k;
        (layers[i].numel < small_limit ? small : large).push_back(i);
    }
    auto layer_out = [&](int64_t i) {
        return LayerOut{out.index + offset[i], value_slot(out.values, out.encoding, offset[i]),
                        out.scales + i};
    };

    std::vector<char> finite(L, 1);

    // Largest first, so the dynamic schedule ends with the cheap ones and threads finish together.
    std::stable_sort(small.begin(), small.end(),
                     [&](int64_t a, int64_t b) { return layers[a].numel > layers[b].numel; });
    std::vector<std::unique_ptr<Scratch>> scratch(T);
    for (auto& ws : scratch) ws = pool().take();
#pragma omp parallel num_threads(T)
    {
        Scratch& ws = *scratch[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < static_cast<int64_t>(small.size()); ++j) {
            const int64_t i = small[j];
            finite[i] = prune_layer(layers[i], 1, ws, layer_out(i), out.encoding);
        }
    }
    for (int64_t i : large) finite[i] = prune_layer(layers[i], T, *scratch[0], layer_out(i), out.encoding);
    // Back in reverse, so the next call takes each buffer for the same role and never regrows it.
    for (auto it = scratch.rbegin(); it != scratch.rend(); ++it) pool().give(std::move(*it));

    for (int64_t i = 0; i < L; ++i)
        if (!finite[i]) return i;
    if (refresh) refresh_snapshot(layers, T);
    return -1;
}

}  // namespace pyunlearn
