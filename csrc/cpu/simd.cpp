#include "../common.h"

namespace pyunlearn {

// Mirrors the target_clones list in common.h, so a report names the clone that runs.
const char* simd_level() {
#if defined(PYUNLEARN_NATIVE_TUNE)
    return "native (built with -march=native)";
#elif defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
    if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2, FMA, F16C)";
    return "x86-64 (SSE2)";
#else
    return "generic";
#endif
}

}  // namespace pyunlearn
