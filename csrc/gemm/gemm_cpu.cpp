// CPU kernels of the GEMM family. The floating-point inner products and their
// epilogue run in ATen (BLAS and its vectorized elementwise kernels, called by
// the glue in fp32/fp64); here: the exact INT8 and FP8 GEMMs and their
// quantization, all OpenMP-parallel through at::parallel_for. Compiled with -ffp-contract=off so the INT8
// scaling rounds exactly as on the GPU.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm/gemm_math.h"
#include "gemm/gemm_params.h"

namespace dsk::gemm {
namespace {

template <typename T, typename F>
inline void store_as(void* p, int64_t i, F v) {
  static_cast<T*>(p)[i] = static_cast<T>(v);
}

template <typename F>
inline void store_any(void* p, DType t, int64_t i, F v) {
  switch (t) {
    case DType::kFloat16: store_as<c10::Half>(p, i, static_cast<float>(v)); break;
    case DType::kBFloat16: store_as<c10::BFloat16>(p, i, static_cast<float>(v)); break;
    case DType::kFloat64: store_as<double>(p, i, v); break;
    default: store_as<float>(p, i, static_cast<float>(v)); break;
  }
}

// Round half to even for |v| <= 2^22 (exactly rintf on that range; see quant_cpu.cpp).
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

template <typename T>
void quantize_rows_typed(const QuantizeRowsParams& p) {
  const T* x = static_cast<const T*>(p.x);
  at::parallel_for(0, p.rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(p.cols, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * p.cols;
      float amax = 0.0f;
      bool finite = true;
      for (int64_t i = 0; i < p.cols; ++i) {
        const float v = static_cast<float>(xr[i]);
        finite = finite && std::isfinite(v);
        amax = std::max(amax, std::fabs(v));
      }
      float scale = amax / 127.0f;
      if (scale == 0.0f) scale = 1.0f;
      if (!finite) scale = std::numeric_limits<float>::quiet_NaN();
      p.scales[r] = scale;
      int8_t* qr = p.q + r * p.cols;
      for (int64_t i = 0; i < p.cols; ++i) {
        if (!finite) {
          qr[i] = 0;
          continue;
        }
        float c = round_half_even(static_cast<float>(xr[i]) / scale);
        c = std::min(std::max(c, -127.0f), 127.0f);
        qr[i] = static_cast<int8_t>(static_cast<int>(c));
      }
    }
  });
}

// Exact INT8 GEMM: blocks of rows x columns per task; the K loop accumulates
// in int32 (|acc| <= 128 * 128 * K fits for K <= 131,071, checked by the glue).
void int8_gemm_typed(const Int8GemmParams& p) {
  constexpr int64_t kBlockM = 16, kBlockN = 64;
  const int64_t mb = (p.m + kBlockM - 1) / kBlockM, nb = (p.n + kBlockN - 1) / kBlockN;
  at::parallel_for(0, mb * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / nb) * kBlockM, n0 = (t % nb) * kBlockN;
      const int64_t m1 = std::min(m0 + kBlockM, p.m), n1 = std::min(n0 + kBlockN, p.n);
      for (int64_t m = m0; m < m1; ++m) {
        const int8_t* ar = p.a + m * p.k;
        for (int64_t n = n0; n < n1; ++n) {
          int32_t acc = 0;
          if (p.acc) {
            acc = p.acc[m * p.n + n];
          } else {
            const int8_t* wr = p.w + n * p.k;
            for (int64_t k = 0; k < p.k; ++k)
              acc += static_cast<int32_t>(ar[k]) * static_cast<int32_t>(wr[k]);
          }
          float v = int8_dequant(acc, p.a_scales[m], p.w_scales[n]);
          if (p.bias) v = v + p.bias[n];
          store_any(p.out, p.out_dtype, m * p.n + n, v);
        }
      }
    }
  });
}

inline float fp8_to_float(uint8_t bits) {
  // All 256 e4m3 values, decoded once (a table lookup per element in the GEMM).
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b)
      t[b] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table[bits];
}

template <typename T>
void quantize_fp8_typed(const QuantizeFp8Params& p) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t row_blocks = (p.rows + p.block_rows - 1) / p.block_rows;
  const int64_t per_item = row_blocks * p.col_blocks;
  at::parallel_for(0, p.batch * per_item, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      // Block b: matrix b / per_item, then row-block-major; rows index the whole batch.
      const int64_t first = (b / per_item) * p.rows, rb = (b % per_item) / p.col_blocks;
      const int64_t r0 = first + rb * p.block_rows, c0 = (b % p.col_blocks) * kFp8Block;
      const int64_t r1 = first + std::min((rb + 1) * p.block_rows, p.rows);
      const int64_t c1 = std::min(c0 + kFp8Block, p.cols);
      float amax = 0.0f;
      bool finite = true;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) {
          const float v = static_cast<float>(x[r * p.cols + c]);
          finite = finite && std::isfinite(v);
          amax = std::max(amax, std::fabs(v));
        }
      }
      float scale = amax / 448.0f;
      if (scale == 0.0f) scale = 1.0f;
      if (!finite) scale = std::numeric_limits<float>::quiet_NaN();
      p.scales[b] = scale;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) {
          float v = finite ? static_cast<float>(x[r * p.cols + c]) / scale : 0.0f;
          v = std::min(std::max(v, -448.0f), 448.0f);
          p.q[r * p.cols + c] = c10::Float8_e4m3fn(v).x;
        }
      }
    }
  });
}

// Row blocks of at most `block_m` rows inside one group (a plain GEMM is one group).
struct Fp8RowBlock {
  int64_t m0 = 0, m1 = 0, group = 0;
};

std::vector<Fp8RowBlock> fp8_row_blocks(const Fp8GemmParams& p, int64_t block_m) {
  auto offset = [&](int64_t g) {
    return p.offsets_int64 ? static_cast<const int64_t*>(p.offsets)[g]
                           : static_cast<int64_t>(static_cast<const int32_t*>(p.offsets)[g]);
  };
  std::vector<Fp8RowBlock> blocks;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t lo = p.offsets ? offset(g) : 0, hi = p.offsets ? offset(g + 1) : p.m;
    for (int64_t m0 = lo; m0 < hi; m0 += block_m) blocks.push_back({m0, std::min(m0 + block_m, hi), g});
  }
  return blocks;
}

// a's rows and w's tile decoded to fp32 once per task; w's tile is stored
// transposed ([K][kBlockN]) so the innermost loop runs over 64 independent
// output columns: it vectorizes while every sum keeps the contract's order.
void fp8_gemm_typed(const Fp8GemmParams& p) {
  constexpr int64_t kBlockM = 16, kBlockN = 64;
  const std::vector<Fp8RowBlock> row_blocks = fp8_row_blocks(p, kBlockM);
  const int64_t mb = static_cast<int64_t>(row_blocks.size()), nb = (p.n + kBlockN - 1) / kBlockN;
  const int64_t w_scale_rows = (p.n + kFp8Block - 1) / kFp8Block;
  at::parallel_for(0, mb * nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> a_rows(static_cast<size_t>(kBlockM * p.k)), w_t(static_cast<size_t>(p.k * kBlockN));
    float w_scale[kBlockN], part[kBlockN], acc[kBlockN];
    for (int64_t t = t0; t < t1; ++t) {
      const Fp8RowBlock& rb = row_blocks[t / nb];
      const int64_t m0 = rb.m0, m1 = rb.m1, n0 = (t % nb) * kBlockN;
      const int64_t cols = std::min(kBlockN, p.n - n0);
      const uint8_t* w = p.w + rb.group * p.n * p.k;
      const float* w_scales = p.w_scales + rb.group * w_scale_rows * p.k_blocks;
      for (int64_t i = 0; i < (m1 - m0) * p.k; ++i) a_rows[i] = fp8_to_float(p.a[m0 * p.k + i]);
      std::fill(w_t.begin(), w_t.end(), 0.0f);  // columns past N stay 0 (never stored)
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t k = 0; k < p.k; ++k) w_t[k * kBlockN + j] = fp8_to_float(w[(n0 + j) * p.k + k]);
      for (int64_t m = m0; m < m1; ++m) {
        const float* ar = a_rows.data() + (m - m0) * p.k;
        std::fill(acc, acc + kBlockN, 0.0f);
        for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
          const int64_t k1 = std::min((kb + 1) * kFp8Block, p.k);
          std::fill(part, part + kBlockN, 0.0f);
          for (int64_t k = kb * kFp8Block; k < k1; ++k) {
            const float av = ar[k];
            const float* wk = w_t.data() + k * kBlockN;
            for (int64_t j = 0; j < kBlockN; ++j) part[j] = part[j] + av * wk[j];
          }
          const float a_scale = p.a_scales[m * p.k_blocks + kb];
          for (int64_t j = 0; j < kBlockN; ++j)
            w_scale[j] = w_scales[(std::min(n0 + j, p.n - 1) / kFp8Block) * p.k_blocks + kb];
          for (int64_t j = 0; j < kBlockN; ++j) acc[j] = acc[j] + (part[j] * a_scale) * w_scale[j];
        }
        for (int64_t j = 0; j < cols; ++j) store_any(p.out, p.out_dtype, m * p.n + n0 + j, acc[j]);
      }
    }
  });
}

}  // namespace

void quantize_fp8_cpu(const QuantizeFp8Params& p) {
  if (p.batch == 0 || p.rows == 0 || p.cols == 0) return;
  switch (p.x_dtype) {
    case DType::kFloat16: quantize_fp8_typed<c10::Half>(p); break;
    case DType::kBFloat16: quantize_fp8_typed<c10::BFloat16>(p); break;
    default: quantize_fp8_typed<float>(p); break;
  }
}

void fp8_gemm_cpu(const Fp8GemmParams& p) {
  if (p.m == 0 || p.n == 0) return;
  fp8_gemm_typed(p);
}

void int8_gemm_cpu(const Int8GemmParams& p) {
  if (p.m == 0 || p.n == 0) return;
  int8_gemm_typed(p);
}

void quantize_rows_int8_cpu(const QuantizeRowsParams& p) {
  if (p.rows == 0) return;
  switch (p.x_dtype) {
    case DType::kFloat16: quantize_rows_typed<c10::Half>(p); break;
    case DType::kBFloat16: quantize_rows_typed<c10::BFloat16>(p); break;
    default: quantize_rows_typed<float>(p); break;
  }
}

}  // namespace dsk::gemm
