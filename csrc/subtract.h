// subtract_sparse: params[layer][idx] −= alpha · value · scale for many stored rows at once.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace pyunlearn {

struct SubtractLayer {
    float* param;
    int64_t numel;
    int64_t k;
};

struct StoredRows {
    const uint32_t* index;  // [rows × row_len] gap-encoded, as prune_topk writes them
    const void* values;     // [rows × row_len] float32 or float16
    const float* scales;    // [rows × layers]
    ValueEncoding encoding;
    int64_t rows;
    int64_t row_len;  // Σ k
};

// A stored row the kernel refused: which row (position in `rows`), which layer, and why.
struct BadRow {
    int64_t row = -1;  // -1: every row was valid and has been applied
    int64_t layer = -1;
    const char* reason = nullptr;  // a static string
};

// Applies every row and returns BadRow{} (row == -1). If a row's indices repeat or run past its
// layer, returns the lowest such (row, layer) and writes nothing: the caller turns that into an
// error naming the step and the layer. Rows are applied in a canonical order (by their bytes)
// and each parameter is updated by one thread, so the result is bit-identical whatever the
// thread count or the order in which rows are given.
BadRow subtract_sparse_cpu(const std::vector<SubtractLayer>& layers, const StoredRows& rows,
                           float alpha, int threads);

// Settings of the CPU kernel, exposed so tests can push small inputs through every path:
// calls with fewer than serial_below stored entries (rows × Σk) run on the calling thread
// alone (waking a second thread costs more than they do, and far more under load); layers
// are cut into tiles of tile_positions parameters (each tile is one thread's task); with simd
// off, the portable loops run even where AVX-512 is present.
struct SubtractTuning {
    int64_t serial_below;
    int64_t tile_positions;
    bool simd;
};
SubtractTuning subtract_tuning();
void set_subtract_tuning(const SubtractTuning& tuning);

// The floor the benchmark holds subtract_sparse to: every byte of `read` (the stored rows)
// read once and every float of `touch` (the parameters) read and written back once, unchanged,
// streaming on `threads` threads. Returns an OR of what it read, so nothing is optimised away.
struct TouchSpan {
    float* data;
    int64_t numel;
};
uint64_t stream_floor_cpu(const std::vector<ByteRange>& read, const std::vector<TouchSpan>& touch, int threads);

}  // namespace pyunlearn
