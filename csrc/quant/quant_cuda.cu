// CUDA kernels for blockwise INT8/INT4 quantization. No torch headers: the
// host glue (quant_api.cpp) validates tensors and fills the params structs.
//
// quantize: one warp per quantization block, two passes over the block (the
//   second hits L1/L2), 16-byte vector loads; codes stored as VEC-byte vectors.
// dequantize (and the W-row sum): one thread per VEC consecutive elements, all
//   inside one block so one scale applies; one 16-byte store per thread.
// Exactness: __fmul_rn/__fadd_rn/__fdiv_rn keep nvcc from contracting into
// FMAs, so results match the CPU kernels and reference.py bit for bit.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/rng.h"
#include "quant/quant_codes.h"
#include "quant/quant_params.h"

namespace dsk::quant {
namespace {

constexpr int kThreads = 256;

template <int BITS>
__device__ __forceinline__ int encode(float x, float scale, bool finite, bool stochastic,
                                      uint32_t key, int64_t index) {
  constexpr float kQmax = BITS == 8 ? 127.0f : 7.0f;
  if (!finite) return 0;
  const float v = __fdiv_rn(x, scale);
  float r = stochastic ? floorf(__fadd_rn(v, uniform01(key, index))) : rintf(v);
  r = fminf(fmaxf(r, -kQmax), kQmax);
  return static_cast<int>(r);
}

template <typename T, int VEC, int BITS>
__global__ void __launch_bounds__(kThreads) quantize_kernel(QuantizeParams p) {
  static_assert(BITS == 8 || VEC % 2 == 0, "int4 packs codes in pairs");
  constexpr float kQmax = BITS == 8 ? 127.0f : 7.0f;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int lane = threadIdx.x & 31;
  const int64_t warps_in_grid = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;

  for (int64_t b = first_warp; b < p.num_blocks; b += warps_in_grid) {
    const int64_t start = b * p.block_size;
    const int64_t len = min(p.block_size, p.n - start);
    const int64_t vec_end = len / VEC * VEC;
    const T* xb = x + start;

    // Pass 1: absmax via the bit pattern of |x| (see quant_cpu.cpp).
    uint32_t amax = 0;
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < vec_end; i += 32 * VEC) {
      const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(xb + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) amax = max(amax, __float_as_uint(to_float(v.v[k])) & 0x7fffffffu);
    }
    for (int64_t i = vec_end + lane; i < len; i += 32) {
      amax = max(amax, __float_as_uint(to_float(xb[i])) & 0x7fffffffu);
    }
    amax = warp_max(amax);
    const bool finite = amax < 0x7f800000u;
    float scale = __fdiv_rn(__uint_as_float(amax), kQmax);
    if (scale == 0.0f) scale = 1.0f;
    if (!finite) scale = __int_as_float(0x7fc00000);  // quiet NaN
    if (lane == 0) {
      p.scales[b] = scale;
      if (!finite) *p.nonfinite = true;  // every writer stores the same value
    }

    // Pass 2: codes.
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < vec_end; i += 32 * VEC) {
      const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(xb + i);
      int c[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        c[k] = encode<BITS>(to_float(v.v[k]), scale, finite, p.stochastic, p.seed_key, start + i + k);
      if constexpr (BITS == 8) {
        Vec<int8_t, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) out.v[k] = static_cast<int8_t>(c[k]);
        *reinterpret_cast<Vec<int8_t, VEC>*>(static_cast<int8_t*>(p.q) + start + i) = out;
      } else {
        Vec<uint8_t, VEC / 2> out;
#pragma unroll
        for (int k = 0; k < VEC / 2; ++k)
          out.v[k] = pack_int4(c[2 * k], c[2 * k + 1]);
        *reinterpret_cast<Vec<uint8_t, VEC / 2>*>(static_cast<uint8_t*>(p.q) + (start + i) / 2) = out;
      }
    }
    // Tail of the block (only the last block, or a block_size not a multiple of VEC).
    if constexpr (BITS == 8) {
      for (int64_t i = vec_end + lane; i < len; i += 32) {
        static_cast<int8_t*>(p.q)[start + i] = static_cast<int8_t>(
            encode<8>(to_float(xb[i]), scale, finite, p.stochastic, p.seed_key, start + i));
      }
    } else {
      for (int64_t i = vec_end + 2 * lane; i < len; i += 64) {
        const int lo = encode<4>(to_float(xb[i]), scale, finite, p.stochastic, p.seed_key, start + i);
        const int hi = i + 1 < len ? encode<4>(to_float(xb[i + 1]), scale, finite, p.stochastic,
                                               p.seed_key, start + i + 1)
                                   : 0;
        static_cast<uint8_t*>(p.q)[(start + i) / 2] = pack_int4(lo, hi);
      }
    }
  }
}

template <int BITS, int VEC>
struct CodeVec;  // VEC codes as loaded from memory
template <int VEC>
struct CodeVec<8, VEC> {
  Vec<int8_t, VEC> raw;
  __device__ __forceinline__ int get(int k) const { return raw.v[k]; }
};
template <int VEC>
struct CodeVec<4, VEC> {
  Vec<uint8_t, VEC / 2> raw;
  __device__ __forceinline__ int get(int k) const { return code_at<4>(raw.v, k); }
};

template <typename OutT, int VEC, int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(DequantizeParams p) {
  const uint8_t* __restrict__ q = static_cast<const uint8_t*>(p.q);
  OutT* __restrict__ out = static_cast<OutT*>(p.out);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_vecs = p.n / VEC;

  for (int64_t v = tid; v < num_vecs; v += stride) {
    const int64_t i0 = v * VEC;
    const int64_t blk = i0 / p.block_size;  // VEC divides block_size: one scale per vector
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
    for (int64_t w = 0; w < p.rows; ++w) {
      const float s = p.scales[w * p.num_blocks + blk];
      const int64_t byte0 = BITS == 8 ? i0 : i0 / 2;
      const CodeVec<BITS, VEC> c =
          *reinterpret_cast<const CodeVec<BITS, VEC>*>(q + w * p.q_row_stride + byte0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = __fadd_rn(acc[k], __fmul_rn(static_cast<float>(c.get(k)), s));
    }
    Vec<OutT, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = from_float<OutT>(acc[k]);
    *reinterpret_cast<Vec<OutT, VEC>*>(out + i0) = o;
  }
  // Tail: the last n % VEC elements.
  for (int64_t i = num_vecs * VEC + tid; i < p.n; i += stride) {
    const int64_t blk = i / p.block_size;
    float acc = 0.0f;
    for (int64_t w = 0; w < p.rows; ++w) {
      acc = __fadd_rn(acc, __fmul_rn(static_cast<float>(code_at<BITS>(q + w * p.q_row_stride, i)),
                                     p.scales[w * p.num_blocks + blk]));
    }
    out[i] = from_float<OutT>(acc);
  }
}

// ---------------------------------------------------------------------------
// Launchers: pick the widest vector the block size and alignment allow.
// ---------------------------------------------------------------------------

inline bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename T, int BITS>
cudaError_t launch_quantize(const QuantizeParams& p, cudaStream_t stream) {
  constexpr int kMaxVec = 16 / sizeof(T);
  const int64_t warps = p.num_blocks;
  const int64_t blocks = grid_size(warps * 32, kThreads);
  const bool x_aligned = aligned(p.x, 16);
  auto fits = [&](int vec) { return x_aligned && p.block_size % vec == 0; };
  if (fits(kMaxVec)) {
    quantize_kernel<T, kMaxVec, BITS><<<blocks, kThreads, 0, stream>>>(p);
  } else if (fits(2)) {
    quantize_kernel<T, 2, BITS><<<blocks, kThreads, 0, stream>>>(p);
  } else if constexpr (BITS == 8) {
    quantize_kernel<T, 1, BITS><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    return cudaErrorMisalignedAddress;  // the host glue passes 16-byte aligned x for int4
  }
  return cudaGetLastError();
}

template <typename OutT, int BITS>
cudaError_t launch_dequantize(const DequantizeParams& p, cudaStream_t stream) {
  // VEC outputs per thread: one 16-byte store, so a warp's stores are
  // contiguous (wider per-thread stores would stride the warp's addresses).
  constexpr int kMaxVec = 16 / sizeof(OutT);
  auto fits = [&](int vec) {
    const int64_t code_bytes = BITS == 8 ? vec : vec / 2;
    return p.block_size % vec == 0 && aligned(p.q, code_bytes) &&
           (p.rows == 1 || p.q_row_stride % code_bytes == 0);
  };
  auto launch = [&](auto vec_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    const int64_t blocks = grid_size(p.n / kVec + 1, kThreads);
    dequantize_kernel<OutT, kVec, BITS><<<blocks, kThreads, 0, stream>>>(p);
  };
  if (fits(kMaxVec)) launch(std::integral_constant<int, kMaxVec>{});
  else if (kMaxVec > 4 && fits(4)) launch(std::integral_constant<int, 4>{});
  else if (fits(2)) launch(std::integral_constant<int, 2>{});
  else if constexpr (BITS == 8) launch(std::integral_constant<int, 1>{});
  else launch(std::integral_constant<int, 2>{});  // int4: pairs share a byte; rows start on bytes
  return cudaGetLastError();
}

template <int BITS>
cudaError_t quantize_bits(const QuantizeParams& p, cudaStream_t s) {
  switch (p.x_dtype) {
    case DType::kFloat32: return launch_quantize<float, BITS>(p, s);
    case DType::kFloat16: return launch_quantize<__half, BITS>(p, s);
    case DType::kBFloat16: return launch_quantize<__nv_bfloat16, BITS>(p, s);
    case DType::kFloat64: break;  // rejected by the host glue
  }
  return cudaErrorInvalidValue;
}

template <int BITS>
cudaError_t dequantize_bits(const DequantizeParams& p, cudaStream_t s) {
  switch (p.out_dtype) {
    case DType::kFloat32: return launch_dequantize<float, BITS>(p, s);
    case DType::kFloat16: return launch_dequantize<__half, BITS>(p, s);
    case DType::kBFloat16: return launch_dequantize<__nv_bfloat16, BITS>(p, s);
    case DType::kFloat64: break;  // rejected by the host glue
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int quantize_cuda(const QuantizeParams& p, void* stream) {
  if (p.num_blocks == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return p.bits == 8 ? quantize_bits<8>(p, s) : quantize_bits<4>(p, s);
}

int dequantize_cuda(const DequantizeParams& p, void* stream) {
  if (p.n == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  return p.bits == 8 ? dequantize_bits<8>(p, s) : dequantize_bits<4>(p, s);
}

}  // namespace dsk::quant
