// Shared helpers of the CPU kernels: float keys, the float16 scale rule, thread counts.
#pragma once

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pyunlearn {

enum class ValueEncoding : int { Float32 = 0, Float16 = 1 };

// A read-only run of bytes (a buffer handed in from Python).
struct ByteRange {
    const void* data;
    int64_t bytes;
};

// |x| as unsigned bits. Non-negative floats order like their bit patterns, so selection and
// radix histograms run on integers; -0.0 and 0.0 get the same key.
inline uint32_t abs_key(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return u & 0x7fffffffu;
}

// Keys at or above this are Inf or NaN: the maximum key alone tells whether a layer is finite.
constexpr uint32_t kNonFiniteKey = 0x7f800000u;

// The float16 encoding stores Δ/scale. The scale is a power of two, so the division is exact
// and decoding (half → float, times scale) gives back the rounded value exactly. It puts the
// largest |Δ| of the layer in [2^14, 2^15): no value can reach float16's 65504, and values up
// to 2^29 times smaller are still normal float16 numbers. The clamp keeps the scale a normal
// float32. A layer with max |Δ| = 0 (or k = 0) gets scale 1.
inline float fp16_scale_for(uint32_t max_key) {
    if (max_key == 0) return 1.0f;
    float m;
    std::memcpy(&m, &max_key, sizeof m);
    int e = std::ilogb(m) - 14;
    if (e < -126) e = -126;
    return std::ldexp(1.0f, e);
}

// Hot loops are compiled for three x86-64 levels and the best one is picked when the module
// loads (GCC function multi-versioning), so one build runs on any x86-64 and still uses
// AVX-512 / AVX2 + F16C where present. Builds with PYUNLEARN_NATIVE_TUNE=1 skip this.
#if defined(__x86_64__) && !defined(PYUNLEARN_NATIVE_TUNE)
#define PU_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PU_HOT
#endif

// The instruction-set level the hot loops run at, as the loader picked it.
const char* simd_level();

inline int resolve_threads(int requested) {
    return requested > 0 ? requested : omp_get_max_threads();
}

}  // namespace pyunlearn
