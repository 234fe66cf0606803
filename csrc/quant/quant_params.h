// Plain parameter structs and launchers for blockwise INT8/INT4 quantization.
// Filled by quant_api.cpp (which validates the tensors); the CPU kernels live
// in quant_cpu.cpp and the CUDA kernels in quant_cuda.cu.
//
// Arithmetic contract (shared with deepseek_kernels/reference.py, bitwise):
//   block b holds elements [b*block_size, min((b+1)*block_size, n)).
//   absmax = max |x| in fp32; scale = absmax / qmax (qmax 127 or 7), 1 if that is 0;
//   a block with any NaN/Inf gets scale NaN and codes 0, and sets *nonfinite.
//   code = clamp(rint(x / scale), -qmax, qmax)              (round half to even)
//        = clamp(floor(x / scale + u(seed, i)), -qmax, qmax) (stochastic)
//   dequantized value = fp32(code) * scale; sums add rows in order 0..W-1 in fp32.
//   INT4 packs element 2i in the low nibble and 2i+1 in the high nibble of byte i.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dsk::quant {

struct QuantizeParams {
  const void* x = nullptr;  // [n], contiguous, dtype x_dtype
  DType x_dtype = DType::kFloat32;
  void* q = nullptr;        // int8 [n] (bits 8) or uint8 [ceil(n / 2)] (bits 4)
  float* scales = nullptr;  // [num_blocks]
  bool* nonfinite = nullptr;  // scalar, zeroed by the caller
  int64_t n = 0;
  int64_t block_size = 256;   // even when bits == 4
  int64_t num_blocks = 0;
  int bits = 8;
  bool stochastic = false;
  uint32_t seed_key = 0;
  int cuda_kernel = 2;  // CUDA kernel generation: 1 original, 2 more loads in flight
                        // (DSK_QUANT_KERNEL / _quant_cuda_kernel, quant_api.cpp)
};

// out[i] = sum over rows w of fp32(code[w][i]) * scales[w][i / block_size].
// Plain dequantization is the one-row case.
struct DequantizeParams {
  const void* q = nullptr;         // int8 [rows, n] or uint8 [rows, ceil(n / 2)]
  const float* scales = nullptr;   // [rows, num_blocks]
  void* out = nullptr;             // [n], dtype out_dtype
  DType out_dtype = DType::kFloat32;
  int64_t n = 0;
  int64_t block_size = 256;
  int64_t num_blocks = 0;
  int64_t rows = 1;
  int64_t q_row_stride = 0;        // bytes between rows of q
  int bits = 8;
  int cuda_kernel = 2;             // as in QuantizeParams
};

void quantize_cpu(const QuantizeParams& p);
void dequantize_cpu(const DequantizeParams& p);

#ifdef DSK_WITH_CUDA
// Launch on `stream` (a cudaStream_t); return the launch's cudaError_t as int
// so that this header needs no CUDA include.
int quantize_cuda(const QuantizeParams& p, void* stream);
int dequantize_cuda(const DequantizeParams& p, void* stream);
#endif

}  // namespace dsk::quant
