// Device and pointer queries for the bindings (which include no CUDA header).
#include "device.cuh"
#include "kernels.h"

namespace pyunlearn {
namespace cuda {

int device_of(const void* ptr) {
    cudaPointerAttributes attributes{};
    if (cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
        cudaGetLastError();  // not a pointer the runtime knows: clear the error, answer "no device"
        return -1;
    }
    if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) return -1;
    return attributes.device;
}

int current_device() {
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    return device;
}

void set_device(int device) { check(cudaSetDevice(device), "cudaSetDevice"); }

int runtime_version() {
    int version = 0;
    check(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
    return version;
}

}  // namespace cuda
}  // namespace pyunlearn
