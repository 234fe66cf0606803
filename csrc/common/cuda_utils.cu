#include "common/cuda_utils.cuh"

namespace dsk {

int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 132;
  if (cached[device] == 0) {
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        count <= 0)
      count = 132;
    cached[device] = count;  // benign race: every writer stores the same value
  }
  return cached[device];
}

bool device_has_dependent_launch() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {0};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return false;
  if (cached[device] == 0) {
    int major = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess;
    cached[device] = ok && major >= 9 ? 2 : 1;  // benign race, as above
  }
  return cached[device] == 2;
}

}  // namespace dsk
