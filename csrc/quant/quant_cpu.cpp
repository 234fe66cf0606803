// CPU kernels for blockwise INT8/INT4 quantization: one pass per block,
// blocks spread over threads with at::parallel_for (OpenMP in torch's builds),
// inner loops written so the compiler vectorizes them. Compiled with
// -ffp-contract=off so products and sums round exactly as on the GPU.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/rng.h"
#include "quant/quant_codes.h"
#include "quant/quant_params.h"

namespace dsk::quant {
namespace {

inline float load_float(const float* p, int64_t i) { return p[i]; }
inline float load_float(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_float(const c10::BFloat16* p, int64_t i) {
  // bf16 -> fp32 is a shift; written out so the loop vectorizes.
  uint16_t bits;
  std::memcpy(&bits, p + i, sizeof(bits));
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

inline uint32_t abs_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b & 0x7fffffffu;
}

// Round half to even for |v| < 2^22 with plain adds (vectorizes without
// SSE4.1's roundps): adding 1.5 * 2^23 leaves no fraction bits, and the
// addition itself rounds to nearest even. Identical to rintf on that range.
inline float round_half_even(float v) {
  // Without -ffast-math the compiler may not fold (v + M) - M into v.
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

// floor for |v| < 2^22 from the rounding above (vectorizes, unlike floorf
// without SSE4.1); exact, so it equals the GPU's floorf.
inline float floor_small(float v) {
  const float r = round_half_even(v);
  return r - static_cast<float>(r > v);  // branch-free: vectorizes
}

constexpr int64_t kGrainElements = 1 << 16;

template <typename T, int BITS>
void quantize_blocks(const QuantizeParams& p, int64_t b_begin, int64_t b_end,
                     std::vector<int8_t>& codes, bool& saw_nonfinite) {
  constexpr float kQmax = BITS == 8 ? 127.0f : 7.0f;
  const T* x = static_cast<const T*>(p.x);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t start = b * p.block_size;
    const int64_t len = std::min(p.block_size, p.n - start);
    const T* xb = x + start;

    // absmax as the max of |x|'s bit pattern: order-preserving for finite
    // values, and >= 0x7f800000 exactly when the block holds NaN/Inf.
    uint32_t amax = 0;
    for (int64_t i = 0; i < len; ++i) {
      const uint32_t a = abs_bits(load_float(xb, i));
      amax = a > amax ? a : amax;
    }
    const bool finite = amax < 0x7f800000u;
    float amax_f;
    std::memcpy(&amax_f, &amax, sizeof(amax_f));
    float scale = amax_f / kQmax;
    if (scale == 0.0f) scale = 1.0f;
    if (!finite) {
      scale = std::numeric_limits<float>::quiet_NaN();
      saw_nonfinite = true;
    }
    p.scales[b] = scale;

    int8_t* c = codes.data();
    if (!finite) {
      std::fill(c, c + len, int8_t{0});
    } else if (p.stochastic) {
      for (int64_t i = 0; i < len; ++i) {
        const float v = load_float(xb, i) / scale;
        float r = floor_small(v + uniform01(p.seed_key, start + i));
        r = std::min(std::max(r, -kQmax), kQmax);
        c[i] = static_cast<int8_t>(r);
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        float r = round_half_even(load_float(xb, i) / scale);
        r = std::min(std::max(r, -kQmax), kQmax);
        c[i] = static_cast<int8_t>(static_cast<int>(r));
      }
    }

    if constexpr (BITS == 8) {
      std::memcpy(static_cast<int8_t*>(p.q) + start, c, static_cast<size_t>(len));
    } else {
      uint8_t* out = static_cast<uint8_t*>(p.q) + start / 2;  // block_size is even
      const int64_t pairs = len / 2;
      for (int64_t j = 0; j < pairs; ++j) {
        out[j] = pack_int4(c[2 * j], c[2 * j + 1]);
      }
      if (len % 2) out[pairs] = pack_int4(c[len - 1], 0);
    }
  }
}

template <typename T, int BITS>
void quantize_typed(const QuantizeParams& p) {
  std::atomic<bool> nonfinite{false};
  const int64_t grain = std::max<int64_t>(1, kGrainElements / p.block_size);
  at::parallel_for(0, p.num_blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    std::vector<int8_t> codes(static_cast<size_t>(std::min(p.block_size, p.n)));  // a block's codes
    bool saw = false;
    quantize_blocks<T, BITS>(p, b_begin, b_end, codes, saw);
    if (saw) nonfinite.store(true, std::memory_order_relaxed);
  });
  if (nonfinite.load()) *p.nonfinite = true;
}

template <typename OutT>
inline void store_out(OutT* out, int64_t i, float v) {
  out[i] = static_cast<OutT>(v);
}

template <typename OutT, int BITS>
void dequantize_typed(const DequantizeParams& p) {
  const uint8_t* q = static_cast<const uint8_t*>(p.q);
  OutT* out = static_cast<OutT*>(p.out);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / p.block_size);
  at::parallel_for(0, p.num_blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    std::vector<float> acc(static_cast<size_t>(std::min(p.block_size, p.n)));  // a block's sums
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t start = b * p.block_size;
      const int64_t len = std::min(p.block_size, p.n - start);
      // fp32 output accumulates in place; fp16/bf16 go through acc.
      float* a = std::is_same_v<OutT, float> ? reinterpret_cast<float*>(out) + start : acc.data();
      if (p.rows != 1) std::fill(a, a + len, 0.0f);
      for (int64_t w = 0; w < p.rows; ++w) {  // fixed row order: deterministic sums
        const uint8_t* row = q + w * p.q_row_stride;
        const float s = p.scales[w * p.num_blocks + b];
        if (p.rows == 1) {
          for (int64_t i = 0; i < len; ++i) a[i] = static_cast<float>(code_at<BITS>(row, start + i)) * s;
        } else {
          for (int64_t i = 0; i < len; ++i) a[i] += static_cast<float>(code_at<BITS>(row, start + i)) * s;
        }
      }
      if constexpr (!std::is_same_v<OutT, float>) {
        for (int64_t i = 0; i < len; ++i) store_out(out, start + i, acc[i]);
      }
    }
  });
}

template <int BITS>
void quantize_dispatch(const QuantizeParams& p) {
  switch (p.x_dtype) {
    case DType::kFloat32: return quantize_typed<float, BITS>(p);
    case DType::kFloat16: return quantize_typed<c10::Half, BITS>(p);
    case DType::kBFloat16: return quantize_typed<c10::BFloat16, BITS>(p);
    case DType::kFloat64: break;  // rejected by the host glue
  }
}

template <int BITS>
void dequantize_dispatch(const DequantizeParams& p) {
  switch (p.out_dtype) {
    case DType::kFloat32: return dequantize_typed<float, BITS>(p);
    case DType::kFloat16: return dequantize_typed<c10::Half, BITS>(p);
    case DType::kBFloat16: return dequantize_typed<c10::BFloat16, BITS>(p);
    case DType::kFloat64: break;  // rejected by the host glue
  }
}

}  // namespace

void quantize_cpu(const QuantizeParams& p) {
  if (p.num_blocks == 0) return;
  if (p.bits == 8) quantize_dispatch<8>(p);
  else quantize_dispatch<4>(p);
}

void dequantize_cpu(const DequantizeParams& p) {
  if (p.n == 0) return;
  if (p.bits == 8) dequantize_dispatch<8>(p);
  else dequantize_dispatch<4>(p);
}

}  // namespace dsk::quant
