// pyunlearn.kernels._native_cuda: the CUDA kernels over raw device pointers and a stream handle, all
// given as Python ints (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream). No libtorch
// and no CUDA header here: the module works with whatever CUDA build of torch is installed, as
// long as the driver runs this module's CUDA runtime (linked statically).
//
// A thin layer: it checks counts, sizes and that the memory is on one CUDA device (the first
// pointer of each argument is looked up; the rest must be on the same device, as the Python
// caller guarantees), switches to that device, and releases the GIL while the kernels are queued
// (and, where a status must be returned, waited for). Argument checks with layer names belong
// to the Python face (pyunlearn/ops.py); these only keep a direct caller from crashing.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels.h"

#ifndef PYUNLEARN_CUDA_MODULE_NAME
#define PYUNLEARN_CUDA_MODULE_NAME _native_cuda
#endif

namespace py = pybind11;
using namespace pyunlearn::cuda;

namespace {

template <class T>
T* pointer(uint64_t address) {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

Encoding encoding_of(const std::string& value_dtype) {
    if (value_dtype == "float32") return Encoding::Float32;
    if (value_dtype == "float16") return Encoding::Float16;
    throw py::value_error("value_dtype must be 'float16' or 'float32', got '" + value_dtype + "'");
}

void check_counts(size_t layers, size_t got, const char* arg) {
    if (got != layers)
        throw py::value_error(std::string(arg) + " has " + std::to_string(got) + " entries, expected one per layer (" +
                              std::to_string(layers) + ")");
}

void check_layer(uint64_t numel, uint64_t k, size_t i) {
    if (numel > 0xffffffffull)
        throw py::value_error("numels[" + std::to_string(i) + "] = " + std::to_string(numel) +
                              ": more than 2^32 - 1 elements cannot be addressed with uint32 indices");
    if (k > numel)
        throw py::value_error("k[" + std::to_string(i) + "] = " + std::to_string(k) + " must lie in [0, " +
                              std::to_string(numel) + "]");
}

void check_pointer(uint64_t address, const std::string& what) {
    if (address == 0) throw py::value_error(what + " is a null pointer");
}

// Switches to the device holding the memory for the call and back afterwards.
class DeviceScope {
public:
    explicit DeviceScope(const std::vector<std::pair<uint64_t, std::string>>& anchors) {
        int device = -1;
        for (const auto& [address, what] : anchors) {
            if (address == 0) continue;
            const int d = device_of(pointer<const void>(address));
            if (d < 0) throw py::value_error(what + " is not CUDA device memory");
            if (device >= 0 && d != device)
                throw py::value_error(what + " is on cuda:" + std::to_string(d) + ", other arguments on cuda:" +
                                      std::to_string(device) + "; all must be on one device");
            device = d;
        }
        if (device < 0) return;
        saved_ = current_device();
        if (saved_ != device) set_device(device); else saved_ = -1;
    }
    ~DeviceScope() {
        if (saved_ >= 0) {
            try {
                set_device(saved_);
            } catch (...) {
            }
        }
    }

private:
    int saved_ = -1;
};

std::vector<PruneLayer> prune_layers(const std::vector<uint64_t>& before, const std::vector<uint64_t>& after,
                                     const std::vector<uint64_t>& numels, const std::vector<uint64_t>& k) {
    const size_t L = numels.size();
    check_counts(L, before.size(), "before");
    check_counts(L, after.size(), "after");
    check_counts(L, k.size(), "k");
    std::vector<PruneLayer> layers(L);
    for (size_t i = 0; i < L; ++i) {
        check_layer(numels[i], k[i], i);
        if (numels[i] > 0) {
            check_pointer(before[i], "before[" + std::to_string(i) + "]");
            check_pointer(after[i], "after[" + std::to_string(i) + "]");
        }
        layers[i] = PruneLayer{pointer<const float>(after[i]), pointer<float>(before[i]), numels[i], k[i]};
    }
    return layers;
}

uint64_t first_nonzero(const std::vector<uint64_t>& v) {
    for (uint64_t x : v)
        if (x != 0) return x;
    return 0;
}

py::object prune(const std::vector<uint64_t>& before, const std::vector<uint64_t>& after,
                 const std::vector<uint64_t>& numels, const std::vector<uint64_t>& k, uint64_t index, uint64_t values,
                 uint64_t scales, const std::string& value_dtype, bool refresh, uint64_t stream, uint64_t status,
                 uint64_t workspace, uint64_t workspace_size) {
    const std::vector<PruneLayer> layers = prune_layers(before, after, numels, k);
    uint64_t total_k = 0;
    for (uint64_t x : k) total_k += x;
    if (total_k > 0) {
        check_pointer(index, "index");
        check_pointer(values, "values");
    }
    if (!layers.empty()) check_pointer(scales, "scales");
    if (workspace == 0 && workspace_size != 0) throw py::value_error("workspace_size given without a workspace");
    const PruneOutput out{pointer<uint32_t>(index), pointer<void>(values), pointer<float>(scales), encoding_of(value_dtype)};
    const DeviceScope scope({{first_nonzero(after), "after"}, {first_nonzero(before), "before"}, {index, "index"},
                             {values, "values"}, {scales, "scales"}, {status, "status"}, {workspace, "workspace"}});
    int64_t result;
    {
        py::gil_scoped_release release;
        result = prune_topk_cuda(layers, out, refresh, pointer<int64_t>(status), status == 0, pointer<void>(workspace),
                                 workspace_size, pointer<void>(stream));
    }
    if (status != 0) return py::none();
    return py::int_(result);
}

uint64_t workspace_size(const std::vector<uint64_t>& numels, const std::vector<uint64_t>& k) {
    check_counts(numels.size(), k.size(), "k");
    std::vector<PruneLayer> layers(numels.size());
    for (size_t i = 0; i < numels.size(); ++i) {
        check_layer(numels[i], k[i], i);
        layers[i] = PruneLayer{nullptr, nullptr, numels[i], k[i]};
    }
    return prune_workspace_bytes(layers);
}

py::object subtract(const std::vector<uint64_t>& params, const std::vector<uint64_t>& numels,
                    const std::vector<uint64_t>& k, uint64_t index, uint64_t values, uint64_t scales, uint64_t rows,
                    const std::string& value_dtype, float alpha, uint64_t stream) {
    const size_t L = numels.size();
    check_counts(L, params.size(), "params");
    check_counts(L, k.size(), "k");
    std::vector<SubtractLayer> layers(L);
    uint64_t total_k = 0;
    for (size_t i = 0; i < L; ++i) {
        check_layer(numels[i], k[i], i);
        if (numels[i] > 0) check_pointer(params[i], "params[" + std::to_string(i) + "]");
        layers[i] = SubtractLayer{pointer<float>(params[i]), numels[i], k[i]};
        total_k += k[i];
    }
    if (rows > 0 && L > 0) {
        if (total_k > 0) {
            check_pointer(index, "index");
            check_pointer(values, "values");
        }
        check_pointer(scales, "scales");
    }
    const StoredRows stored{pointer<const uint32_t>(index), pointer<const void>(values), pointer<const float>(scales),
                            encoding_of(value_dtype), rows, total_k};
    const DeviceScope scope({{first_nonzero(params), "params"}, {index, "index"}, {values, "values"}, {scales, "scales"}});
    BadRow bad;
    {
        py::gil_scoped_release release;
        bad = subtract_sparse_cuda(layers, stored, alpha, pointer<void>(stream));
    }
    if (bad.row < 0) return py::none();
    return py::make_tuple(bad.row, bad.layer, std::string(bad.reason));
}

}  // namespace

PYBIND11_MODULE(PYUNLEARN_CUDA_MODULE_NAME, m) {
    m.doc() =
        "pyunlearn's CUDA kernels over device pointers (Python ints) and a CUDA stream handle; the "
        "twins of pyunlearn.kernels._native's, with the same output bits. Pointers: tensor.data_ptr() of "
        "contiguous tensors on one device; stream: torch.cuda.current_stream().cuda_stream.";
#if defined(PYUNLEARN_CUDA_EMULATE)
    m.attr("EMULATED") = true;
#else
    m.attr("EMULATED") = false;
#endif
    m.def("prune_topk", &prune, py::arg("before"), py::arg("after"), py::arg("numels"), py::arg("k"),
          py::arg("index"), py::arg("values"), py::arg("scales"), py::arg("value_dtype"), py::arg("refresh"),
          py::arg("stream"), py::kw_only(), py::arg("status") = 0, py::arg("workspace") = 0,
          py::arg("workspace_size") = 0,
          "Per layer: delta = after - before (float32, numels[i] each), the k[i] largest |delta| (ties to "
          "the lower index) into index (uint32 gaps, sum(k)), values (float32, or float16 delta/scale) and "
          "scales (float32, one per layer); with refresh, before := after once every layer is finite.\n"
          "Without `status`: waits for the stream and returns -1, or the first layer whose delta holds NaN "
          "or Inf (then no `before` changed). With `status` (a device int64): writes that value there in "
          "stream order and returns None at once, without synchronizing.\n"
          "`workspace` (device memory of prune_workspace_size(numels, k) bytes, used in stream order): "
          "otherwise the workspace is taken with cudaMallocAsync on the stream and freed there.");
    m.def("prune_workspace_size", &workspace_size, py::arg("numels"), py::arg("k"),
          "Bytes of device workspace prune_topk needs for these layers.");
    m.def("subtract_sparse", &subtract, py::arg("params"), py::arg("numels"), py::arg("k"), py::arg("index"),
          py::arg("values"), py::arg("scales"), py::arg("rows"), py::arg("value_dtype"), py::arg("alpha"),
          py::arg("stream"),
          "params[i][idx] -= alpha * value * scale for every stored row (index: uint32 [rows, sum(k)], "
          "values: float32 or float16 [rows, sum(k)], scales: float32 [rows, layers]), bit-identical to "
          "the CPU kernel. Checks the rows first and waits for that check (one stream "
          "synchronization): returns (row, layer, reason) of the first bad one, changing nothing, or "
          "None with the update queued on the stream.");
    m.def("runtime_version", &runtime_version, "The CUDA runtime version this module was built with (e.g. 13000).");
}
