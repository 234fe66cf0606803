#include "common/cuda_utils.cuh"

namespace dsk {
namespace {

// Attribute kAttr of the current device, read once per device; `fallback` where it
// cannot be read (or reads <= 0). Every value the helpers below ask for is > 0.
template <cudaDeviceAttr kAttr>
int cached_device_attribute(int fallback) {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return fallback;
  if (cached[device] == 0) {
    int value = 0;
    if (cudaDeviceGetAttribute(&value, kAttr, device) != cudaSuccess || value <= 0) value = fallback;
    cached[device] = value;  // benign race: every writer stores the same value
  }
  return cached[device];
}

}  // namespace

int multiprocessor_count() { return cached_device_attribute<cudaDevAttrMultiProcessorCount>(132); }

bool device_has_dependent_launch() {
  return cached_device_attribute<cudaDevAttrComputeCapabilityMajor>(0) >= 9;
}

}  // namespace dsk
