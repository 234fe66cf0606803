// Plain parameter structs and launchers for the GEMM family. Filled by
// gemm_api.cpp (which validates the tensors); CPU kernels in gemm_cpu.cpp,
// CUDA kernels in gemm_cuda.cu. Kernels see raw pointers only.
//
// Layouts (all row-major, contiguous): a [M, K], weight [N, K] (nn.Linear),
// out [M, N]; out = act(a @ weight^T + bias), accumulated in fp32 (fp64 for
// fp64 inputs on the CPU).
//
// Grouped: rows of a are packed by group; group g owns rows
// [offsets[g], offsets[g + 1]) and multiplies them by weight[g] ([N, K]).
//
// INT8 W8A8 arithmetic contract (CPU, CUDA and reference.py agree bitwise):
//   acc = sum_k int32(a[m, k]) * int32(w[n, k])            (exact in int32)
//   out = ((float(acc) * a_scale[m]) * w_scale[n]) + bias[n] (fp32, no FMA),
//   then rounded to the output dtype.
// Row-wise INT8 quantization: scale = amax / 127 (1 when amax == 0; NaN, with
//   all codes 0, when the row holds NaN/Inf); code = clamp(rint(x / scale)).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dsk::gemm {

enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4 };

struct GemmParams {
  const void* a = nullptr;       // [M, K], dtype ab_dtype
  const void* b = nullptr;       // [groups, N, K], dtype ab_dtype
  const float* bias = nullptr;   // [N] fp32, or nullptr
  void* out = nullptr;           // [M, N], dtype out_dtype
  DType ab_dtype = DType::kBFloat16;
  DType out_dtype = DType::kBFloat16;
  int64_t m = 0, n = 0, k = 0;
  // Grouped GEMM: offsets [groups + 1] (int32 or int64) on the data's device;
  // nullptr for a plain GEMM (one group, rows [0, M)).
  const void* offsets = nullptr;
  bool offsets_int64 = false;
  int64_t groups = 1;
  Activation activation = Activation::kNone;
};

// The CPU epilogue: out[m, n] = act(acc[m, n] + bias[n]) cast to out_dtype.
// acc is fp32 (fp64 when ab_dtype is fp64), [M, N] contiguous.
struct EpilogueParams {
  const void* acc = nullptr;
  bool acc_double = false;
  const void* bias = nullptr;  // dtype bias_dtype, or nullptr
  DType bias_dtype = DType::kFloat32;
  void* out = nullptr;
  DType out_dtype = DType::kFloat32;
  int64_t m = 0, n = 0;
  Activation activation = Activation::kNone;
};

struct Int8GemmParams {
  const int8_t* a = nullptr;        // [M, K]
  const float* a_scales = nullptr;  // [M]
  const int8_t* w = nullptr;        // [N, K]
  const float* w_scales = nullptr;  // [N]
  const float* bias = nullptr;      // [N] fp32, or nullptr
  void* out = nullptr;              // [M, N], dtype out_dtype
  DType out_dtype = DType::kBFloat16;
  int64_t m = 0, n = 0, k = 0;
};

struct QuantizeRowsParams {
  const void* x = nullptr;  // [rows, cols], dtype x_dtype
  DType x_dtype = DType::kFloat32;
  int8_t* q = nullptr;      // [rows, cols]
  float* scales = nullptr;  // [rows]
  int64_t rows = 0, cols = 0;
};

void epilogue_cpu(const EpilogueParams& p);
void int8_gemm_cpu(const Int8GemmParams& p);
void quantize_rows_int8_cpu(const QuantizeRowsParams& p);

#ifdef DSK_WITH_CUDA
// Launch on `stream` (a cudaStream_t); return the launch's cudaError_t as int.
// gemm_cuda: bf16/fp16 on tensor cores (mma.sync, sm_80+), K % 8 == 0 and
// 16-byte aligned a/b required (the glue pads otherwise); fp32 on a SIMT kernel.
int gemm_cuda(const GemmParams& p, void* stream);
int int8_gemm_cuda(const Int8GemmParams& p, void* stream);
int quantize_rows_int8_cuda(const QuantizeRowsParams& p, void* stream);
#endif

}  // namespace dsk::gemm
