// Subtract many stored sparse rows from the live parameters at once.
//
// Each layer is cut into tiles of consecutive positions. A first pass checks every row's gaps
// (vectorised block sums and minima, so it costs one read of the index) and notes where each
// tile starts in each row. The second pass gives
// each tile to one thread, which applies all rows to it in a canonical order while the tile
// sits in cache. A parameter is thus touched by one thread, in one order, whatever the thread
// count or the order the rows came in: the result is bit-identical.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "../subtract.h"

namespace pyunlearn {
namespace {

constexpr int64_t kTilePositions = int64_t{1} << 16;  // 256 KB of float32 parameters: stays in L2
constexpr int64_t kMaxCursors = int64_t{1} << 22;     // bounds the cursor table at 64 MB

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

// Sum and minimum of a block of gaps, vectorised: the first pass checks every gap and skips
// whole blocks that end before the next tile boundary, so it costs one read of the index.
PU_HOT void gap_block_stats(const uint32_t* gaps, int64_t len, uint64_t* sum, uint32_t* min) {
    uint64_t s = 0;
    uint32_t m = UINT32_MAX;
    for (int64_t j = 0; j < len; ++j) {
        s += gaps[j];
        m = gaps[j] < m ? gaps[j] : m;
    }
    *sum = s;
    *min = m;
}

// param[idx] −= alpha · Δ for entries [begin, end) of one row's layer segment; `prev` is the
// index decoded just before `begin`. (Staging decoded positions and scaled values in buffers
// for vector loops measured slower than this fused loop: the scatter dominates either way.)
PU_HOT void apply_entries(float* param, const uint32_t* gaps, const void* values,
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

}  // namespace

BadRow subtract_sparse_cpu(const std::vector<SubtractLayer>& layers, const StoredRows& rows,
                           float alpha, int threads) {
    const int T = resolve_threads(threads);
    const int64_t L = static_cast<int64_t>(layers.size());
    const int64_t S = rows.rows;
    if (S == 0 || L == 0) return {};

    int64_t tile = kTilePositions, total_tiles = 0;
    auto count_tiles = [&] {
        total_tiles = 0;
        for (const auto& layer : layers) total_tiles += std::max<int64_t>(1, (layer.numel + tile - 1) / tile);
    };
    count_tiles();
    while (S * (total_tiles + L) > kMaxCursors && tile < (int64_t{1} << 40)) {
        tile *= 2;
        count_tiles();
    }

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
#pragma omp parallel for schedule(dynamic, 4) num_threads(T)
    for (int64_t seg = 0; seg < S * L; ++seg) {
        const int64_t s = seg / L, i = seg % L;
        const int64_t n = layers[i].numel, k = layers[i].k;
        const int64_t tiles = tile_begin[i + 1] - tile_begin[i];
        const uint32_t* gaps = rows.index + s * rows.row_len + offset[i];
        Cursor* c = cursors.data() + s * cursors_per_row + cursor_begin[i];
        int64_t pos = -1, next_tile = 1;
        c[0] = {0, -1};
        const char* bad = nullptr;
        for (int64_t e = 0; e < k && !bad;) {
            const int64_t len = std::min<int64_t>(64, k - e);
            uint64_t sum;
            uint32_t min;
            gap_block_stats(gaps + e, len, &sum, &min);
            if (min == 0) {
                bad = "repeats an index (a zero gap)";
            } else if (next_tile >= tiles || pos + static_cast<int64_t>(sum) < next_tile * tile) {
                pos += static_cast<int64_t>(sum);  // no tile boundary inside: skip the block
                e += len;
            } else {
                for (const int64_t block_end = e + len; e < block_end; ++e) {
                    const int64_t at = pos + gaps[e];
                    while (next_tile < tiles && at >= next_tile * tile) c[next_tile++] = {e, pos};
                    pos = at;
                }
            }
            if (!bad && pos >= n) bad = "decodes to an index past the layer's end";  // indices only grow
        }
        if (bad) {
#pragma omp critical(pyunlearn_subtract_error)
            if (bad_segment < 0 || seg < bad_segment) {
                bad_segment = seg;
                bad_reason = bad;
            }
            continue;
        }
        for (; next_tile <= tiles; ++next_tile) c[next_tile] = {k, pos};
    }
    if (bad_segment >= 0) return {bad_segment / L, bad_segment % L, bad_reason};

    const std::vector<int64_t> order = canonical_order(rows, L);
    const size_t width = value_width(rows.encoding);
    std::vector<int64_t> layer_of_tile(tile_begin[L]);
    for (int64_t i = 0; i < L; ++i)
        for (int64_t j = tile_begin[i]; j < tile_begin[i + 1]; ++j) layer_of_tile[j] = i;

#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
    for (int64_t t = 0; t < tile_begin[L]; ++t) {
        const int64_t i = layer_of_tile[t], j = t - tile_begin[i];
        for (int64_t s : order) {
            const Cursor* c = cursors.data() + s * cursors_per_row + cursor_begin[i] + j;
            if (c[0].entry == c[1].entry) continue;
            const int64_t base = s * rows.row_len + offset[i];
            apply_entries(layers[i].param, rows.index + base,
                          static_cast<const char*>(rows.values) + base * width, rows.encoding,
                          c[0].entry, c[1].entry, c[0].prev, rows.scales[s * L + i], alpha);
        }
    }
    return {};
}

}  // namespace pyunlearn
