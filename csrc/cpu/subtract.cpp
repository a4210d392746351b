// Subtract many stored sparse rows from the live parameters at once.
//
// Each layer is cut into tiles of consecutive positions. A first pass checks every row's gaps
// (vectorised block sums and minima, so it costs one read of the index) and notes where each
// tile starts in each row. The second pass gives each tile to one thread, which applies all
// rows to it in a canonical order while the tile sits in cache (on Intel's AVX-512 cores: 16
// entries at a time, gaps decoded by a vector prefix sum, float16 converted in one instruction,
// a gather and a scatter). A parameter is thus touched by one thread, in one order, whatever
// the thread count or the order the rows came in: the result is bit-identical.
//
// Both passes stream the rows from memory; software prefetches run ahead of the hardware
// prefetcher, which stops at every 4 KB page.
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "../subtract.h"

namespace pyunlearn {
namespace {

// Calls with fewer stored entries (rows × Σk) than this run on the calling thread. Measured on
// the 2-core development machine under load: below this, two threads saved at most ~10 µs of
// 40–60 µs in the median, but their slowest tenth took ~20 ms (waiting for a busy core)
// against at most 0.4 ms on one thread; see docs/kernels.md.
std::atomic<int64_t> g_serial_below{int64_t{1} << 15};
std::atomic<int64_t> g_tile_positions{int64_t{1} << 16};  // 256 KB of float32 parameters: stays in L2
std::atomic<bool> g_simd{true};
constexpr int64_t kMaxCursors = int64_t{1} << 22;          // bounds the cursor table at 64 MB
constexpr int64_t kCheckBlock = 64;                        // gaps summed and checked at once
constexpr int64_t kCheckPrefetch = 512;                    // gaps ahead (2 KB) in the first pass
constexpr int64_t kApplyPrefetch = 256;                    // entries ahead in the second pass

// Where a tile begins within one row's segment of a layer: the first entry at or past the
// tile, and the index decoded just before it (−1 at the segment start).
struct Cursor {
    int64_t entry;
    int64_t prev;
};

size_t value_width(ValueEncoding enc) { return enc == ValueEncoding::Float32 ? 4 : 2; }

// Rows sorted by their bytes (index, then values, then scales): a canonical order that does
// not depend on how the caller listed them. Equal rows are interchangeable.
std::vector<int64_t> canonical_order(const StoredRows& rows, int64_t layers) {
    std::vector<int64_t> order(rows.rows);
    for (int64_t s = 0; s < rows.rows; ++s) order[s] = s;
    const size_t index_bytes = rows.row_len * sizeof(uint32_t);
    const size_t value_bytes = rows.row_len * value_width(rows.encoding);
    const size_t scale_bytes = layers * sizeof(float);
    auto values_of = [&](int64_t s) { return static_cast<const char*>(rows.values) + s * value_bytes; };
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        if (int c = std::memcmp(rows.index + a * rows.row_len, rows.index + b * rows.row_len, index_bytes)) return c < 0;
        if (int c = std::memcmp(values_of(a), values_of(b), value_bytes)) return c < 0;
        return std::memcmp(rows.scales + a * layers, rows.scales + b * layers, scale_bytes) < 0;
    });
    return order;
}

// ---- First pass: check the gaps, find the tiles ----------------------------------------------

// Sum and minimum of kCheckBlock gaps (a fixed length: the loop vectorises without a prologue).
// Returns false only where a vector version declines the block; this one never does.
struct BlockStats {
    static bool of(const uint32_t* gaps, uint64_t* sum, uint32_t* min) {
        uint64_t s = 0;
        uint32_t m = UINT32_MAX;
        for (int64_t j = 0; j < kCheckBlock; ++j) {
            s += gaps[j];
            m = gaps[j] < m ? gaps[j] : m;
        }
        *sum = s;
        *min = m;
        return true;
    }
};

// Checks one row's segment of a layer (k gaps decoding into a layer of n positions) and notes
// where each of its `tiles` tiles begins (c[0 .. tiles]). Whole blocks are skipped on their sum
// unless a tile boundary falls inside. Returns the fault, or nullptr: per block, a zero gap is
// reported before an overrun (the reference kernel replicates this order).
template <class Stats>
inline __attribute__((always_inline)) const char* scan_segment(const uint32_t* gaps, int64_t k, int64_t n,
                                                                int64_t tile, int64_t tiles, Cursor* c) {
    int64_t pos = -1, next_tile = 1;
    c[0] = {0, -1};
    for (int64_t e = 0; e < k;) {
        const int64_t len = std::min<int64_t>(kCheckBlock, k - e);
        uint64_t sum = 0;
        uint32_t min = UINT32_MAX;
        if (len == kCheckBlock) {
            for (int64_t q = 0; q < kCheckBlock; q += 16) __builtin_prefetch(gaps + e + kCheckPrefetch + q);
            if (!Stats::of(gaps + e, &sum, &min)) BlockStats::of(gaps + e, &sum, &min);
        } else {
            for (int64_t j = e; j < k; ++j) {
                sum += gaps[j];
                min = std::min(min, gaps[j]);
            }
        }
        if (min == 0) return "repeats an index (a zero gap)";
        if (next_tile >= tiles || pos + static_cast<int64_t>(sum) < next_tile * tile) {
            pos += static_cast<int64_t>(sum);  // no tile boundary inside: skip the block
            e += len;
        } else {
            for (const int64_t block_end = e + len; e < block_end; ++e) {
                const int64_t at = pos + gaps[e];
                while (next_tile < tiles && at >= next_tile * tile) c[next_tile++] = {e, pos};
                pos = at;
            }
        }
        if (pos >= n) return "decodes to an index past the layer's end";  // indices only grow
    }
    for (; next_tile <= tiles; ++next_tile) c[next_tile] = {k, pos};
    return nullptr;
}

PU_HOT const char* scan_segment_generic(const uint32_t* gaps, int64_t k, int64_t n, int64_t tile,
                                        int64_t tiles, Cursor* c) {
    return scan_segment<BlockStats>(gaps, k, n, tile, tiles, c);
}

// ---- Second pass: apply the rows, tile by tile ------------------------------------------------

// param[idx] −= alpha · Δ for entries [begin, end) of one row's layer segment; `prev` is the
// index decoded just before `begin`.
PU_HOT void apply_entries_generic(float* param, const uint32_t* gaps, const void* values,
                                  ValueEncoding enc, int64_t begin, int64_t end, int64_t prev,
                                  float scale, float alpha) {
    int64_t pos = prev;
    if (enc == ValueEncoding::Float32) {
        const float* v = static_cast<const float*>(values);
        for (int64_t e = begin; e < end; ++e) {
            pos += gaps[e];
            param[pos] -= alpha * (v[e] * scale);
        }
    } else {
        const _Float16* v = static_cast<const _Float16*>(values);
        for (int64_t e = begin; e < end; ++e) {
            pos += gaps[e];
            param[pos] -= alpha * (static_cast<float>(v[e]) * scale);
        }
    }
}

#if defined(__x86_64__)
// GCC 12 warns that intrinsics' internal _mm512_undefined_* values are uninitialised (a false
// positive, GCC bug 105593): silence that here only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define PU_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// Block sums in 32-bit lanes, exact while every gap is below 2^30 (four gaps per lane); a
// block with a larger gap is declined and summed in 64 bits instead.
struct BlockStatsAvx512 {
    PU_AVX512 static bool of(const uint32_t* gaps, uint64_t* sum, uint32_t* min) {
        const __m512i a0 = _mm512_loadu_si512(gaps), a1 = _mm512_loadu_si512(gaps + 16),
                      a2 = _mm512_loadu_si512(gaps + 32), a3 = _mm512_loadu_si512(gaps + 48);
        const __m512i mx = _mm512_max_epu32(_mm512_max_epu32(a0, a1), _mm512_max_epu32(a2, a3));
        if (_mm512_cmpge_epu32_mask(mx, _mm512_set1_epi32(1 << 30))) return false;
        const __m512i mn = _mm512_min_epu32(_mm512_min_epu32(a0, a1), _mm512_min_epu32(a2, a3));
        const __m512i s = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
        *sum = static_cast<uint64_t>(_mm512_reduce_add_epi64(
            _mm512_add_epi64(_mm512_and_si512(s, _mm512_set1_epi64(0xffffffff)), _mm512_srli_epi64(s, 32))));
        *min = _mm512_cmpeq_epi32_mask(mn, _mm512_setzero_si512()) ? 0 : 1;
        return true;
    }
};

PU_AVX512 const char* scan_segment_avx512(const uint32_t* gaps, int64_t k, int64_t n, int64_t tile,
                                          int64_t tiles, Cursor* c) {
    return scan_segment<BlockStatsAvx512>(gaps, k, n, tile, tiles, c);
}

// Inclusive prefix sum of 16 uint32 lanes (mod 2^32): four shifted adds.
PU_AVX512 inline __m512i prefix_sum16(__m512i x) {
    const __m512i z = _mm512_setzero_si512();
    x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, z, 15));
    x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, z, 14));
    x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, z, 12));
    return _mm512_add_epi32(x, _mm512_alignr_epi32(x, z, 8));
}

template <ValueEncoding Enc>
PU_AVX512 inline __m512 load_values(const void* values, int64_t e, __mmask16 m) {
    if constexpr (Enc == ValueEncoding::Float32) {
        return _mm512_maskz_loadu_ps(m, static_cast<const float*>(values) + e);
    } else {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(values) + e));
    }
}

// apply_entries_generic, 16 entries at a time. Positions are int32 relative to the tile's
// first parameter `tile_param` (the tile holds at most 2^30): entries [begin, end) all lie in
// the tile, so sums taken mod 2^32 give the exact positions even when the first gap jumps in
// from far below. Within a row positions strictly increase, so a scatter never holds an
// address twice, and two blocks of a row never share one: the loop is software-pipelined,
// gathering block i + 1 before scattering block i (~6% faster than in turn). The arithmetic is
// the scalar loop's (alpha · (v · scale), then the subtraction, no fused multiply-add), so the
// bits are the same.
template <ValueEncoding Enc>
PU_AVX512 void apply_entries_avx512(float* tile_param, int64_t prev, const uint32_t* gaps,
                                    const void* values, int64_t begin, int64_t end, float scale,
                                    float alpha) {
    __m512i base = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(prev)));
    const __m512 sv = _mm512_set1_ps(scale), av = _mm512_set1_ps(alpha);
    const __m512i last = _mm512_set1_epi32(15);
    const size_t width = Enc == ValueEncoding::Float32 ? 4 : 2;
    // Positions and alpha · Δ of the 16 entries from e (those in mask m).
    auto decode = [&](int64_t e, __mmask16 m, __m512i* pos, __m512* u) PU_AVX512 {
        *pos = _mm512_add_epi32(prefix_sum16(_mm512_maskz_loadu_epi32(m, gaps + e)), base);
        base = _mm512_permutexvar_epi32(last, *pos);
        *u = _mm512_mul_ps(av, _mm512_mul_ps(load_values<Enc>(values, e, m), sv));
    };
    int64_t e = begin;
    if (end - e >= 32) {
        __m512i pos;
        __m512 u;
        decode(e, 0xFFFF, &pos, &u);
        __m512 p = _mm512_i32gather_ps(pos, tile_param, 4);
        for (e += 16; e + 16 <= end; e += 16) {
            _mm_prefetch(reinterpret_cast<const char*>(gaps + e + kApplyPrefetch), _MM_HINT_T0);
            _mm_prefetch(static_cast<const char*>(values) + (e + kApplyPrefetch) * width, _MM_HINT_T0);
            __m512i next_pos;
            __m512 next_u;
            decode(e, 0xFFFF, &next_pos, &next_u);
            const __m512 next_p = _mm512_i32gather_ps(next_pos, tile_param, 4);
            _mm512_i32scatter_ps(tile_param, pos, _mm512_sub_ps(p, u), 4);
            pos = next_pos;
            u = next_u;
            p = next_p;
        }
        _mm512_i32scatter_ps(tile_param, pos, _mm512_sub_ps(p, u), 4);
    }
    for (; e < end; e += 16) {
        const __mmask16 m = end - e >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (end - e)) - 1);
        __m512i pos;
        __m512 u;
        decode(e, m, &pos, &u);
        const __m512 p = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, pos, tile_param, 4);
        _mm512_mask_i32scatter_ps(tile_param, m, pos, _mm512_sub_ps(p, u), 4);
    }
}

bool have_avx512() {
    static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return yes;
}

// Gather and scatter are fast on Intel's AVX-512 cores: on the development machine's Xeon,
// 64 ResNet-18-shaped rows at keep 0.1 take ~80 ms of CPU time on one thread with them against
// ~101 ms with the portable loops. On AMD's they are microcoded, and an earlier gather/scatter
// version measured slower than the scalar loop on an EPYC: the apply pass keeps the scalar loop
// there (the check pass has no gather and vectorises anywhere).
bool have_fast_scatter() {
    static const bool yes = have_avx512() && __builtin_cpu_is("intel");
    return yes;
}
#pragma GCC diagnostic pop
#else
bool have_avx512() { return false; }
bool have_fast_scatter() { return false; }
#endif

const char* scan(bool avx512, const uint32_t* gaps, int64_t k, int64_t n, int64_t tile, int64_t tiles, Cursor* c) {
#if defined(__x86_64__)
    if (avx512) return scan_segment_avx512(gaps, k, n, tile, tiles, c);
#endif
    return scan_segment_generic(gaps, k, n, tile, tiles, c);
}

// Entries [begin, end) of one row's segment of a layer, all inside the tile starting at `lo`.
void apply(bool avx512, float* param, int64_t lo, const uint32_t* gaps, const void* values,
           ValueEncoding enc, int64_t begin, int64_t end, int64_t prev, float scale, float alpha) {
#if defined(__x86_64__)
    if (avx512) {
        if (enc == ValueEncoding::Float32)
            apply_entries_avx512<ValueEncoding::Float32>(param + lo, prev - lo, gaps, values, begin, end, scale, alpha);
        else
            apply_entries_avx512<ValueEncoding::Float16>(param + lo, prev - lo, gaps, values, begin, end, scale, alpha);
        return;
    }
#endif
    apply_entries_generic(param, gaps, values, enc, begin, end, prev, scale, alpha);
}

// ---- The benchmark's floor --------------------------------------------------------------------

PU_HOT uint64_t or_reduce(const unsigned char* p, int64_t bytes) {
    uint64_t acc = 0;
    const int64_t words = bytes / 8;
    for (int64_t i = 0; i < words; ++i) {
        uint64_t w;
        std::memcpy(&w, p + 8 * i, 8);
        acc |= w;
    }
    for (int64_t i = 8 * words; i < bytes; ++i) acc |= p[i];
    return acc;
}

PU_HOT void rewrite(float* data, int64_t n) {
    uint32_t zero = 0;
    asm volatile("" : "+r"(zero));  // opaque: the compiler must load, combine and store
    uint32_t* u = reinterpret_cast<uint32_t*>(data);
    for (int64_t i = 0; i < n; ++i) u[i] ^= zero;
}

}  // namespace

SubtractTuning subtract_tuning() { return {g_serial_below.load(), g_tile_positions.load(), g_simd.load()}; }
void set_subtract_tuning(const SubtractTuning& tuning) {
    g_serial_below.store(tuning.serial_below);
    g_tile_positions.store(std::max<int64_t>(1, tuning.tile_positions));
    g_simd.store(tuning.simd);
}

uint64_t stream_floor_cpu(const std::vector<ByteRange>& read, const std::vector<TouchSpan>& touch, int threads) {
    struct Task {
        const void* read;
        float* touch;
        int64_t size;
    };
    constexpr int64_t kPiece = int64_t{1} << 20;  // bytes
    std::vector<Task> tasks;
    for (const auto& r : read)
        for (int64_t o = 0; o < r.bytes; o += kPiece)
            tasks.push_back({static_cast<const char*>(r.data) + o, nullptr, std::min(kPiece, r.bytes - o)});
    for (const auto& t : touch)
        for (int64_t o = 0; o < t.numel; o += kPiece / 4)
            tasks.push_back({nullptr, t.data + o, std::min(kPiece / 4, t.numel - o)});
    uint64_t acc = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(resolve_threads(threads)) reduction(| : acc)
    for (int64_t j = 0; j < static_cast<int64_t>(tasks.size()); ++j) {
        if (tasks[j].read)
            acc |= or_reduce(static_cast<const unsigned char*>(tasks[j].read), tasks[j].size);
        else
            rewrite(tasks[j].touch, tasks[j].size);
    }
    return acc;
}

BadRow subtract_sparse_cpu(const std::vector<SubtractLayer>& layers, const StoredRows& rows,
                           float alpha, int threads) {
    const int64_t L = static_cast<int64_t>(layers.size());
    const int64_t S = rows.rows;
    if (S == 0 || L == 0) return {};
    // A small call is done before a second thread would even wake up: run it here alone.
    const int T = threads <= 0 && S * rows.row_len < g_serial_below.load() ? 1 : resolve_threads(threads);
    const bool avx512 = g_simd.load() && have_avx512();

    int64_t tile = g_tile_positions.load(), total_tiles = 0;
    auto count_tiles = [&] {
        total_tiles = 0;
        for (const auto& layer : layers) total_tiles += std::max<int64_t>(1, (layer.numel + tile - 1) / tile);
    };
    count_tiles();
    while (S * (total_tiles + L) > kMaxCursors && tile < (int64_t{1} << 40)) {
        tile *= 2;
        count_tiles();
    }
    const bool vector_apply = avx512 && have_fast_scatter() && tile <= (int64_t{1} << 30);  // int32 positions in a tile

    // Per layer: its offset in a row, its first tile, and its first cursor slot (a layer of
    // t tiles owns t + 1 cursors per row: the last marks the segment's end).
    std::vector<int64_t> offset(L + 1, 0), tile_begin(L + 1, 0), cursor_begin(L + 1, 0);
    for (int64_t i = 0; i < L; ++i) {
        const int64_t tiles = std::max<int64_t>(1, (layers[i].numel + tile - 1) / tile);
        offset[i + 1] = offset[i] + layers[i].k;
        tile_begin[i + 1] = tile_begin[i] + tiles;
        cursor_begin[i + 1] = cursor_begin[i] + tiles + 1;
    }
    const int64_t cursors_per_row = cursor_begin[L];
    std::vector<Cursor> cursors(S * cursors_per_row);

    int64_t bad_segment = -1;  // lowest failing s·L + i, so the report does not depend on timing
    const char* bad_reason = nullptr;
#pragma omp parallel for schedule(dynamic, 4) num_threads(T) if (T > 1)
    for (int64_t seg = 0; seg < S * L; ++seg) {
        const int64_t s = seg / L, i = seg % L;
        const char* bad = scan(avx512, rows.index + s * rows.row_len + offset[i], layers[i].k, layers[i].numel,
                               tile, tile_begin[i + 1] - tile_begin[i],
                               cursors.data() + s * cursors_per_row + cursor_begin[i]);
        if (bad) {
#pragma omp critical(pyunlearn_subtract_error)
            if (bad_segment < 0 || seg < bad_segment) {
                bad_segment = seg;
                bad_reason = bad;
            }
        }
    }
    if (bad_segment >= 0) return {bad_segment / L, bad_segment % L, bad_reason};

    const std::vector<int64_t> order = canonical_order(rows, L);
    const size_t width = value_width(rows.encoding);
    std::vector<int64_t> layer_of_tile(tile_begin[L]);
    for (int64_t i = 0; i < L; ++i)
        for (int64_t j = tile_begin[i]; j < tile_begin[i + 1]; ++j) layer_of_tile[j] = i;

#pragma omp parallel for schedule(dynamic, 1) num_threads(T) if (T > 1)
    for (int64_t t = 0; t < tile_begin[L]; ++t) {
        const int64_t i = layer_of_tile[t], j = t - tile_begin[i];
        for (int64_t s : order) {
            const Cursor* c = cursors.data() + s * cursors_per_row + cursor_begin[i] + j;
            if (c[0].entry == c[1].entry) continue;
            const int64_t base = s * rows.row_len + offset[i];
            apply(vector_apply, layers[i].param, j * tile, rows.index + base,
                  static_cast<const char*>(rows.values) + base * width, rows.encoding, c[0].entry, c[1].entry,
                  c[0].prev, rows.scales[s * L + i], alpha);
        }
    }
    return {};
}

}  // namespace pyunlearn
