// prune_topk: per layer, Δ = after − before; keep the k largest |Δ| (ties to the lower index),
// write them as gap-encoded sorted indices and encoded values into one flat row.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace pyunlearn {

struct PruneLayer {
    const float* after;
    float* before;  // read; overwritten with `after` when refresh is on and every layer is finite
    int64_t numel;
    int64_t k;      // 0 <= k <= numel
};

struct PruneOutput {
    uint32_t* index;  // [Σk] gaps: idx_0 + 1, then idx_j − idx_{j−1}
    void* values;     // [Σk] float32 Δ, or float16 Δ/scale
    float* scales;    // [layers] 1 for float32; the power-of-two scale for float16
    ValueEncoding encoding;
};

// Returns -1 on success. If any layer's Δ holds NaN or Inf, returns the lowest such layer's
// position and leaves every `before` untouched (the row is then garbage).
int64_t prune_topk_cpu(const std::vector<PruneLayer>& layers, const PruneOutput& out,
                       bool refresh, int threads);

// Thresholds of the thread split, exposed so tests can push small inputs through the parallel
// paths: layers below small_layer_limit elements are each handled whole by one thread (larger
// ones are split across all threads); models below serial_below elements run on one thread.
struct PruneTuning {
    int64_t small_layer_limit;
    int64_t serial_below;
};
PruneTuning prune_tuning();
void set_prune_tuning(const PruneTuning& tuning);

}  // namespace pyunlearn
