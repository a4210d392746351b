// The CUDA twins of prune_topk and subtract_sparse (csrc/prune.h, csrc/subtract.h), over device
// pointers and a stream handle. Same contracts, same output bits as the CPU kernels. This header
// needs no CUDA headers, so the pybind11 module (bindings.cpp) is plain C++.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pyunlearn {
namespace cuda {

enum class Encoding : int { Float32 = 0, Float16 = 1 };

struct PruneLayer {
    const float* after;  // device
    float* before;       // device; overwritten with `after` when refresh is on and all is finite
    uint64_t numel;      // < 2^32 (indices are uint32)
    uint64_t k;          // 0 <= k <= numel
};

struct PruneOutput {
    uint32_t* index;  // device [Σk]: gaps, idx_0 + 1 then idx_j − idx_{j−1}
    void* values;     // device [Σk]: float32 Δ, or float16 Δ/scale
    float* scales;    // device [layers]: 1 for float32, the power-of-two scale for float16
    Encoding encoding;
};

// Device bytes prune_topk_cuda needs as workspace for these layers (a caller that prunes the same
// layers every step can allocate it once, e.g. as a torch tensor, and pass it in).
size_t prune_workspace_bytes(const std::vector<PruneLayer>& layers);

// Queues the whole pruning on `stream` (a cudaStream_t). Per layer, Δ = after − before; the k
// largest |Δ| (ties to the lower index) go to `out` exactly as the CPU kernel writes them. The
// status, an int64 on the device, is -1 or the lowest layer whose Δ holds NaN or Inf (then no
// `before` is changed and the row is garbage); with refresh, before := after once every layer is
// known finite, decided on the device (no host round trip).
//   status_device: where to copy the status (device int64), or null.
//   wait: copy the status to the host, synchronize the stream and return it; otherwise return -2
//         at once (nothing synchronizes: read status_device later, in stream order).
//   workspace: device memory of at least prune_workspace_bytes(layers) bytes, used in stream
//         order; or null: then it is taken with cudaMallocAsync on the stream and freed there.
// All pointers must be on the current CUDA device. Throws std::runtime_error on a CUDA error.
int64_t prune_topk_cuda(const std::vector<PruneLayer>& layers, const PruneOutput& out, bool refresh,
                        int64_t* status_device, bool wait, void* workspace, size_t workspace_bytes,
                        void* stream);

struct SubtractLayer {
    float* param;  // device
    uint64_t numel;
    uint64_t k;
};

struct StoredRows {
    const uint32_t* index;  // device [rows × row_len], gap-encoded as prune_topk writes them
    const void* values;     // device [rows × row_len], float32 or float16
    const float* scales;    // device [rows × layers]
    Encoding encoding;
    uint64_t rows;
    uint64_t row_len;  // Σk
};

struct BadRow {
    int64_t row = -1;  // -1: every row was valid and the update is queued
    int64_t layer = -1;
    const char* reason = nullptr;  // the CPU kernel's strings
};

// params[layer][idx] −= alpha · value · scale for every stored row, bit-identical to the CPU
// kernel: each parameter gets the rows in the CPU's canonical order (rows sorted by their bytes),
// with the same float operations (no fused multiply-add). Rows are checked first; a bad row is
// reported like the CPU does (the lowest row, then layer; the same reason) and nothing is
// changed. Checking needs the answer on the host, so this synchronizes `stream` once, after the
// check; the update itself is queued on the stream and not waited for. Workspace is taken with
// cudaMallocAsync on the stream and freed there.
BadRow subtract_sparse_cuda(const std::vector<SubtractLayer>& layers, const StoredRows& rows, float alpha,
                            void* stream);

// The device that holds `ptr`, or -1 if it is no device memory (host or unknown). Sets the
// current device for the calls above when it differs (the caller restores it).
int device_of(const void* ptr);
int current_device();
void set_device(int device);
int runtime_version();

}  // namespace cuda
}  // namespace pyunlearn
