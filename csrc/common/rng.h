// Counter-based random numbers shared by the CPU and CUDA kernels and by
// deepseek_kernels/reference.py: element i's draw depends only on (seed, i),
// so results are reproducible and identical on every device.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace dsk {

// The 'lowbias32' integer hash (C. Wellons): cheap and well mixed.
DSK_HOST_DEVICE uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The 32-bit key that a 64-bit seed selects.
DSK_HOST_DEVICE uint32_t seed_key(uint64_t seed) {
  return hash32(hash32(static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(seed >> 32));
}

// Uniform draw in [0, 1) with 24 random bits (exactly representable in fp32).
DSK_HOST_DEVICE float uniform01(uint32_t key, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  uint32_t r = hash32(static_cast<uint32_t>(i) ^ key);
  r = hash32(r + static_cast<uint32_t>(i >> 32));
  // Through int32 (exact: r >> 8 < 2^24) so CPU loops vectorize the conversion.
  return static_cast<float>(static_cast<int32_t>(r >> 8)) * (1.0f / 16777216.0f);
}

}  // namespace dsk
