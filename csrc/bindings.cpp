// pyunlearn.kernels._native: the kernels over numpy buffers. No libtorch: a CPU tensor's .numpy()
// shares its memory, so nothing is copied, and the module survives torch upgrades.
// The Python face (pyunlearn/ops.py) checks arguments with layer names first; the checks here
// only keep a direct caller from crashing the process.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "fingerprint.h"
#include "prune.h"
#include "subtract.h"

namespace py = pybind11;
using namespace pyunlearn;

namespace {

std::string where(const char* arg, int64_t layer) {
    return layer < 0 ? std::string(arg) : std::string(arg) + "[" + std::to_string(layer) + "]";
}

// Only real numpy arrays: converting anything else would hand the kernel a silent copy, and an
// in-place update would then be lost.
py::array as_array(const py::object& obj, const char* arg, int64_t layer) {
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(where(arg, layer) + " must be a numpy array (pass tensor.numpy()), got " +
                             std::string(py::str(py::type::of(obj))));
    return py::reinterpret_borrow<py::array>(obj);
}

// The data pointer of a C-contiguous numpy array of the given element type, or a ValueError.
template <class T>
T* buffer(const py::array& a, const py::dtype& dtype, const char* arg, int64_t layer, bool write) {
    if (!a.dtype().is(dtype))
        throw py::type_error(where(arg, layer) + " must be " + std::string(py::str(dtype)) +
                             ", got " + std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(where(arg, layer) + " must be C-contiguous");
    if (write && !a.writeable()) throw py::value_error(where(arg, layer) + " must be writable");
    return static_cast<T*>(const_cast<void*>(a.data()));
}

ValueEncoding encoding_of(const py::array& values) {
    if (values.dtype().is(py::dtype::of<float>())) return ValueEncoding::Float32;
    if (values.dtype().is(py::dtype("float16"))) return ValueEncoding::Float16;
    throw py::type_error("values must be float32 or float16, got " + std::string(py::str(values.dtype())));
}

void check_k(int64_t k, int64_t numel, int64_t layer) {
    if (k < 0 || k > numel)
        throw py::value_error("k[" + std::to_string(layer) + "] = " + std::to_string(k) +
                              " must lie in [0, " + std::to_string(numel) + "]");
}

void check_size(const py::array& a, int64_t expect, const char* arg) {
    if (a.size() != expect)
        throw py::value_error(std::string(arg) + " has " + std::to_string(a.size()) +
                              " elements, expected " + std::to_string(expect));
}

// The layers of a prune call, checked: `before`/`after` as arrays (kept so their buffers stay
// alive), the kernel's view of them, and Σk.
struct CheckedLayers {
    std::vector<py::array> before, after;
    std::vector<PruneLayer> layers;
    int64_t total_k = 0;
};

CheckedLayers check_prune_layers(const std::vector<py::object>& before_objs, const std::vector<py::object>& after_objs,
                                 const std::vector<int64_t>& k, bool writable) {
    const size_t L = after_objs.size();
    CheckedLayers c;
    for (size_t i = 0; i < before_objs.size(); ++i) c.before.push_back(as_array(before_objs[i], "before", i));
    for (size_t i = 0; i < L; ++i) c.after.push_back(as_array(after_objs[i], "after", i));
    if (c.before.size() != L || k.size() != L)
        throw py::value_error("before, after and k must have one entry per layer (got " +
                              std::to_string(c.before.size()) + ", " + std::to_string(L) + ", " +
                              std::to_string(k.size()) + ")");
    const auto f32 = py::dtype::of<float>();
    c.layers.resize(L);
    for (size_t i = 0; i < L; ++i) {
        const int64_t n = c.after[i].size();
        if (c.before[i].size() != n)
            throw py::value_error("before[" + std::to_string(i) + "] has " + std::to_string(c.before[i].size()) +
                                  " elements, after[" + std::to_string(i) + "] has " + std::to_string(n));
        if (n > (int64_t{1} << 32) - 1)
            throw py::value_error(where("after", i) + " has more than 2^32 - 1 elements; uint32 indices cannot address it");
        check_k(k[i], n, i);
        c.layers[i] = {buffer<const float>(c.after[i], f32, "after", i, false),
                       buffer<float>(c.before[i], f32, "before", i, writable), n, k[i]};
        c.total_k += k[i];
    }
    return c;
}

// Thread counts come from Python callers: each thread gets its own scratch (histograms, row
// buffers), so an absurd count would exhaust memory inside OpenMP instead of failing here.
constexpr int kMaxThreads = 1024;
static int checked_threads(int threads) {
    if (threads < 0 || threads > kMaxThreads)
        throw py::value_error("threads must be 0 (every available thread) or between 1 and " +
                              std::to_string(kMaxThreads) + ", got " + std::to_string(threads));
    return threads;
}

int64_t prune(const std::vector<py::object>& before_objs, const std::vector<py::object>& after_objs,
              const std::vector<int64_t>& k, const py::object& index_obj, const py::object& values_obj,
              const py::object& scales_obj, bool refresh, int threads) {
    const CheckedLayers c = check_prune_layers(before_objs, after_objs, k, refresh);
    const py::array index = as_array(index_obj, "index", -1), values = as_array(values_obj, "values", -1),
                    scales = as_array(scales_obj, "scales", -1);
    const ValueEncoding enc = encoding_of(values);
    check_size(index, c.total_k, "index");
    check_size(values, c.total_k, "values");
    check_size(scales, static_cast<int64_t>(c.layers.size()), "scales");
    const auto f32 = py::dtype::of<float>();
    PruneOutput out{buffer<uint32_t>(index, py::dtype::of<uint32_t>(), "index", -1, true),
                    buffer<void>(values, values.dtype(), "values", -1, true),
                    buffer<float>(scales, f32, "scales", -1, true), enc};
    py::gil_scoped_release release;
    return prune_topk_cpu(c.layers, out, refresh, checked_threads(threads));
}

// prune_topk over a fixed set of arrays, checked once (ops.Pruner, once per optimizer step):
// each run only allocates the row's arrays and calls the kernel.
class PrunePlan {
public:
    PrunePlan(const std::vector<py::object>& before, const std::vector<py::object>& after,
              const std::vector<int64_t>& k, const std::string& value_dtype)
        : checked_(check_prune_layers(before, after, k, true)),
          values_dtype_(value_dtype == "float32" ? py::dtype::of<float>() : py::dtype("float16")),
          encoding_(value_dtype == "float32" ? ValueEncoding::Float32 : ValueEncoding::Float16) {
        if (value_dtype != "float32" && value_dtype != "float16")
            throw py::value_error("value_dtype must be 'float16' or 'float32', got '" + value_dtype + "'");
    }

    // (index, values, scales) as new arrays; or the first layer whose update is not finite
    // (then no `before` changed).
    py::object run(bool refresh) const {
        const int64_t total_k = checked_.total_k, L = static_cast<int64_t>(checked_.layers.size());
        py::array_t<uint32_t> index(total_k);
        py::array values(values_dtype_, std::vector<py::ssize_t>{total_k});
        py::array_t<float> scales(L);
        const PruneOutput out{index.mutable_data(), values.mutable_data(), scales.mutable_data(), encoding_};
        int64_t bad;
        {
            py::gil_scoped_release release;
            bad = prune_topk_cpu(checked_.layers, out, refresh, 0);
        }
        if (bad >= 0) return py::int_(bad);
        return py::make_tuple(std::move(index), std::move(values), std::move(scales));
    }

private:
    CheckedLayers checked_;
    py::dtype values_dtype_;
    ValueEncoding encoding_;
};

py::object subtract(const std::vector<py::object>& param_objs, const std::vector<int64_t>& k,
              const py::object& index_obj, const py::object& values_obj, const py::object& scales_obj,
              float alpha, int threads) {
    const size_t L = param_objs.size();
    std::vector<py::array> params;
    for (size_t i = 0; i < L; ++i) params.push_back(as_array(param_objs[i], "params", i));
    const py::array index = as_array(index_obj, "index", -1), values = as_array(values_obj, "values", -1),
                    scales = as_array(scales_obj, "scales", -1);
    if (k.size() != L)
        throw py::value_error("params and k must have one entry per layer (got " + std::to_string(L) +
                              " and " + std::to_string(k.size()) + ")");
    if (index.ndim() != 2 || values.ndim() != 2 || scales.ndim() != 2)
        throw py::value_error("index, values and scales must be 2-D: one row per stored step");
    const int64_t S = index.shape(0), K = index.shape(1);
    std::vector<SubtractLayer> layers(L);
    int64_t total_k = 0;
    for (size_t i = 0; i < L; ++i) {
        check_k(k[i], params[i].size(), i);
        layers[i] = {buffer<float>(params[i], py::dtype::of<float>(), "params", i, true), params[i].size(), k[i]};
        total_k += k[i];
    }
    if (K != total_k) throw py::value_error("index rows have " + std::to_string(K) + " entries, sum(k) = " + std::to_string(total_k));
    if (values.shape(0) != S || values.shape(1) != K)
        throw py::value_error("values must have the shape of index");
    if (scales.shape(0) != S || scales.shape(1) != static_cast<int64_t>(L))
        throw py::value_error("scales must have shape (rows, layers)");
    const ValueEncoding enc = encoding_of(values);
    StoredRows rows{buffer<const uint32_t>(index, py::dtype::of<uint32_t>(), "index", -1, false),
                    buffer<const void>(values, values.dtype(), "values", -1, false),
                    buffer<const float>(scales, py::dtype::of<float>(), "scales", -1, false), enc, S, K};
    BadRow bad;
    {
        py::gil_scoped_release release;
        bad = subtract_sparse_cpu(layers, rows, alpha, checked_threads(threads));
    }
    if (bad.row < 0) return py::none();
    return py::make_tuple(bad.row, bad.layer, std::string(bad.reason));
}

// The bytes of C-contiguous buffers (numpy arrays, bytes, memoryviews), held until hashed.
class HeldBuffers {
public:
    explicit HeldBuffers(const std::vector<py::object>& objs) {
        views_.reserve(objs.size());
        for (size_t i = 0; i < objs.size(); ++i) {
            Py_buffer view;
            if (PyObject_GetBuffer(objs[i].ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
                PyErr_Clear();
                throw py::type_error(where("buffers", i) + " must be a C-contiguous buffer (e.g. tensor.numpy()), got " +
                                     std::string(py::str(py::type::of(objs[i]))));
            }
            views_.push_back(view);
        }
    }
    ~HeldBuffers() {
        for (auto& view : views_) PyBuffer_Release(&view);
    }
    HeldBuffers(const HeldBuffers&) = delete;
    HeldBuffers& operator=(const HeldBuffers&) = delete;
    std::vector<ByteRange> ranges() const {
        std::vector<ByteRange> out;
        for (const auto& view : views_) out.push_back({view.buf, static_cast<int64_t>(view.len)});
        return out;
    }

private:
    std::vector<Py_buffer> views_;
};

py::bytes fingerprint(const std::vector<py::object>& objs, int threads) {
    HeldBuffers held(objs);
    const std::vector<ByteRange> parts = held.ranges();
    Digest128 d;
    {
        py::gil_scoped_release release;
        d = fingerprint_cpu(parts, checked_threads(threads));
    }
    unsigned char out[16];
    for (int i = 0; i < 8; ++i) {
        out[i] = static_cast<unsigned char>(d.a >> (56 - 8 * i));
        out[8 + i] = static_cast<unsigned char>(d.b >> (56 - 8 * i));
    }
    return py::bytes(reinterpret_cast<const char*>(out), 16);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "pyunlearn's CPU kernels over numpy buffers (see pyunlearn/ops.py for the API)";
    m.def("prune_topk", &prune, py::arg("before"), py::arg("after"), py::arg("k"), py::arg("index"),
          py::arg("values"), py::arg("scales"), py::arg("refresh"), py::arg("threads") = 0,
          "Fills index/values/scales; returns -1, or the first layer whose delta is not finite "
          "(then no `before` was changed).");
    py::class_<PrunePlan>(m, "PrunePlan",
                          "prune_topk over fixed before/after arrays, checked once; run(refresh) returns "
                          "(index, values, scales) as new arrays, or the first non-finite layer.")
        .def(py::init<const std::vector<py::object>&, const std::vector<py::object>&, const std::vector<int64_t>&,
                      const std::string&>(),
             py::arg("before"), py::arg("after"), py::arg("k"), py::arg("value_dtype"))
        .def("run", &PrunePlan::run, py::arg("refresh"));
    m.def("subtract_sparse", &subtract, py::arg("params"), py::arg("k"), py::arg("index"),
          py::arg("values"), py::arg("scales"), py::arg("alpha"), py::arg("threads") = 0,
          "Applies every row and returns None; or, if a row's indices repeat or run past its layer, "
          "returns (row, layer, reason) of the first such and changes nothing.");
    m.def("fingerprint", &fingerprint, py::arg("buffers"), py::arg("threads") = 0,
          "xh128 of the concatenated bytes of `buffers` (C-contiguous: numpy arrays, bytes), as 16 bytes. "
          "Model identity, not security (see csrc/fingerprint.h); the same whatever the thread count.");
    m.def("simd_level", [] { return std::string(simd_level()); });
    m.def("max_threads", [] { return omp_get_max_threads(); });
    m.def("_prune_tuning", [] {
        const PruneTuning t = prune_tuning();
        return py::make_tuple(t.small_layer_limit, t.serial_below);
    }, "(small_layer_limit, serial_below)");
    m.def("_set_prune_tuning", [](int64_t small_layer_limit, int64_t serial_below) {
        set_prune_tuning({small_layer_limit, serial_below});
    }, py::arg("small_layer_limit"), py::arg("serial_below"));
    m.def("_stream_floor", [](const std::vector<py::object>& read_objs, const std::vector<py::object>& touch_objs,
                              int threads) {
        std::vector<ByteRange> read;
        std::vector<TouchSpan> touch;
        for (size_t i = 0; i < read_objs.size(); ++i) {
            const py::array a = as_array(read_objs[i], "read", i);
            if (!(a.flags() & py::array::c_style)) throw py::value_error(where("read", i) + " must be C-contiguous");
            read.push_back({a.data(), static_cast<int64_t>(a.nbytes())});
        }
        for (size_t i = 0; i < touch_objs.size(); ++i) {
            const py::array a = as_array(touch_objs[i], "touch", i);
            touch.push_back({buffer<float>(a, py::dtype::of<float>(), "touch", i, true), static_cast<int64_t>(a.size())});
        }
        py::gil_scoped_release release;
        return stream_floor_cpu(read, touch, checked_threads(threads));
    }, py::arg("read"), py::arg("touch"), py::arg("threads") = 0,
       "Benchmark floor: reads every byte of `read` once, reads and rewrites every float32 of `touch` once "
       "(unchanged); returns an OR of the bytes read.");
    m.def("_fingerprint_tuning", [] {
        const FingerprintTuning t = fingerprint_tuning();
        return py::make_tuple(t.serial_below_blocks, t.simd);
    }, "(serial_below_blocks, simd)");
    m.def("_set_fingerprint_tuning", [](int64_t serial_below_blocks, bool simd) {
        set_fingerprint_tuning({serial_below_blocks, simd});
    }, py::arg("serial_below_blocks"), py::arg("simd"));
    m.def("_subtract_tuning", [] {
        const SubtractTuning t = subtract_tuning();
        return py::make_tuple(t.serial_below, t.tile_positions, t.simd);
    }, "(serial_below, tile_positions, simd)");
    m.def("_set_subtract_tuning", [](int64_t serial_below, int64_t tile_positions, bool simd) {
        if (tile_positions < 1) throw py::value_error("tile_positions must be at least 1");
        set_subtract_tuning({serial_below, tile_positions, simd});
    }, py::arg("serial_below"), py::arg("tile_positions"), py::arg("simd"));
}
