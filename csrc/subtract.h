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

// Throws std::invalid_argument naming the row and layer when a row's indices repeat or run
// past the layer; nothing is written then. Rows are applied in a canonical order (by their
// bytes) and each parameter is updated by one thread, so the result is bit-identical
// whatever the thread count or the order in which rows are given.
void subtract_sparse_cpu(const std::vector<SubtractLayer>& layers, const StoredRows& rows,
                         float alpha, int threads);

}  // namespace pyunlearn
