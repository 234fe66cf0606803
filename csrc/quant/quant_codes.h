// Reading and packing codes, shared by quant_cpu.cpp and quant_cuda.cu.
// INT4: element 2i in the low nibble and 2i+1 in the high nibble of byte i,
// two's complement.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace dsk::quant {

// The code of element i of a row of codes (int8, or packed int4).
template <int BITS>
DSK_HOST_DEVICE int code_at(const uint8_t* row, int64_t i) {
  if constexpr (BITS == 8) {
    return static_cast<int8_t>(row[i]);
  } else {
    const uint8_t byte = row[i >> 1];
    const int nib = (i & 1) ? (byte >> 4) : (byte & 0xF);
    return nib >= 8 ? nib - 16 : nib;
  }
}

// Two int4 codes (each in [-7, 7]) in one byte.
DSK_HOST_DEVICE uint8_t pack_int4(int lo, int hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}

}  // namespace dsk::quant
