// CUDA kernels for blockwise INT8/INT4 quantization. No torch headers: the
// host glue (quant_api.cpp) validates tensors and fills the params structs.
//
// quantize: one warp per quantization block, two passes over the block (the
//   second hits L1/L2), 16-byte vector loads; codes stored as VEC-byte vectors.
// dequantize (and the W-row sum): one thread per VEC consecutive elements, all
//   inside one block so one scale applies; one 16-byte store per thread.
// Exactness: __fmul_rn/__fadd_rn/__fdiv_rn keep nvcc from contracting into
// FMAs, so results match the CPU kernels and reference.py bit for bit.
//
// Two generations, chosen per call by params.cuda_kernel (A/B in bench_quant.py):
//   v1: the kernels above; few bytes in flight per thread (quantize re-reads the
//       block in pass 2 and waits on each reduction; the W-row sum loads one code
//       vector of 2-4 bytes per row at a time).
//   v2: the same arithmetic in the same order, with more memory-level parallelism:
//       quantize keeps G blocks per warp in registers (64 bytes of x per lane
//       loaded before any reduction), block size a compile-time 32*VEC*NV;
//       dequantize gives each thread J vectors and loads RB rows of codes and
//       scales before summing them in row order. Streaming (evict-first) loads
//       and stores for data touched once. Unsupported shapes fall back to v1.
#include <cstdint>
#include <cstring>

#include "common/cuda_utils.cuh"
#include "common/rng.h"
#include "quant/quant_codes.h"
#include "quant/quant_params.h"

namespace dsk::quant {
namespace {

constexpr int kThreads = 256;
// v2 kernels: at least 4 blocks (1024 threads) per SM, i.e. at most 64
// registers; with 64 bytes of loads per thread that is 64 KB in flight per SM.
constexpr int kMinBlocksV2 = 4;

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

// One warp quantizes block b (v1; v2 uses it for a trailing partial block).
template <typename T, int VEC, int BITS>
__device__ __forceinline__ void quantize_block(const QuantizeParams& p, int64_t b, int lane) {
  static_assert(BITS == 8 || VEC % 2 == 0, "int4 packs codes in pairs");
  constexpr float kQmax = BITS == 8 ? 127.0f : 7.0f;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  {
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

template <typename T, int VEC, int BITS>
__global__ void __launch_bounds__(kThreads) quantize_kernel(QuantizeParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_in_grid = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  for (int64_t b = first_warp; b < p.num_blocks; b += warps_in_grid) {
    quantize_block<T, VEC, BITS>(p, b, lane);
  }
}

// ---------------------------------------------------------------------------
// v2 helpers: streaming memory access by size, codes packed into 32-bit words.
// ---------------------------------------------------------------------------

// NB bytes as an unsigned integer type, for one load or store instruction.
template <int NB> struct Word;
template <> struct Word<2> { using type = unsigned short; };
template <> struct Word<4> { using type = unsigned int; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };

// The 32-bit words of a loaded word (code bytes little-endian, as in memory).
__device__ __forceinline__ void words_of(unsigned short v, uint32_t (&w)[1]) { w[0] = v; }
__device__ __forceinline__ void words_of(unsigned int v, uint32_t (&w)[1]) { w[0] = v; }
__device__ __forceinline__ void words_of(uint2 v, uint32_t (&w)[2]) { w[0] = v.x; w[1] = v.y; }

// NB bytes packed in words (byte k in bits 8*(k%4) of word k/4) stored with
// st.global.cs: outputs are written once, keep them from evicting inputs.
template <int NB>
__device__ __forceinline__ void store_cs(void* dst, const uint32_t (&w)[(NB + 3) / 4]) {
  if constexpr (NB == 2) __stcs(static_cast<unsigned short*>(dst), static_cast<unsigned short>(w[0]));
  else if constexpr (NB == 4) __stcs(static_cast<unsigned int*>(dst), w[0]);
  else if constexpr (NB == 8) __stcs(static_cast<uint2*>(dst), make_uint2(w[0], w[1]));
  else __stcs(static_cast<uint4*>(dst), make_uint4(w[0], w[1], w[2], w[3]));
}

// VEC elements of T from 16 loaded bytes (register moves only).
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> as_vec(const uint4& raw) {
  static_assert(sizeof(Vec<T, VEC>) == sizeof(uint4), "one 16-byte vector");
  Vec<T, VEC> v;
  memcpy(&v, &raw, sizeof(v));
  return v;
}

// Quantize v2: block_size == 32 * VEC * NV (each lane holds NV 16-byte vectors
// of a block: vector j*32+lane, so every load instruction of a warp reads 512
// contiguous bytes). A warp loads G blocks (G*NV vectors per lane, 64 bytes
// when G*NV == 4) before the first reduction; at 1024 resident threads per SM
// (64 registers) that is 64 KB in flight per SM, enough to cover HBM3 latency,
// where v1 had 16 bytes per lane and re-read the block. Same encode() per element as
// v1, so codes and scales are bitwise the same.
template <typename T, int BITS, int NV, int G>
__global__ void __launch_bounds__(kThreads, kMinBlocksV2) quantize_kernel_v2(QuantizeParams p) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int64_t kBlock = 32 * VEC * NV;
  constexpr float kQmax = BITS == 8 ? 127.0f : 7.0f;
  constexpr int kCodeBytes = BITS == 8 ? VEC : VEC / 2;  // per vector
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int lane = threadIdx.x & 31;
  const int64_t warps_in_grid = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t full_blocks = p.n / kBlock;

  for (int64_t b0 = first_warp * G; b0 < full_blocks; b0 += warps_in_grid * G) {
    // All loads first: the predicate is warp-uniform, a missing block reads as 0.
    uint4 raw[G][NV];
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int64_t off = (b0 + g) * kBlock + static_cast<int64_t>(j * 32 + lane) * VEC;
        raw[g][j] = b0 + g < full_blocks ? __ldcs(reinterpret_cast<const uint4*>(x + off))
                                         : make_uint4(0u, 0u, 0u, 0u);
      }
    }
    // Absmax via the bit pattern of |x| (see quant_cpu.cpp); G independent reductions.
    uint32_t amax[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      amax[g] = 0;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const Vec<T, VEC> v = as_vec<T, VEC>(raw[g][j]);
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          amax[g] = max(amax[g], __float_as_uint(to_float(v.v[k])) & 0x7fffffffu);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) amax[g] = warp_max(amax[g]);

#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t b = b0 + g;
      if (b >= full_blocks) break;  // warp-uniform
      const bool finite = amax[g] < 0x7f800000u;
      float scale = __fdiv_rn(__uint_as_float(amax[g]), kQmax);
      if (scale == 0.0f) scale = 1.0f;
      if (!finite) scale = __int_as_float(0x7fc00000);  // quiet NaN
      if (lane == 0) {
        __stcs(p.scales + b, scale);
        if (!finite) *p.nonfinite = true;  // every writer stores the same value
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const Vec<T, VEC> v = as_vec<T, VEC>(raw[g][j]);
        const int64_t i0 = b * kBlock + static_cast<int64_t>(j * 32 + lane) * VEC;
        int c[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          c[k] = encode<BITS>(to_float(v.v[k]), scale, finite, p.stochastic, p.seed_key, i0 + k);
        uint32_t w[(kCodeBytes + 3) / 4] = {};
#pragma unroll
        for (int k = 0; k < kCodeBytes; ++k) {
          uint32_t byte;
          if constexpr (BITS == 8) byte = static_cast<uint32_t>(c[k] & 0xFF);  // two's complement
          else byte = pack_int4(c[2 * k], c[2 * k + 1]);
          w[k / 4] |= byte << (8 * (k % 4));
        }
        store_cs<kCodeBytes>(static_cast<uint8_t*>(p.q) + (BITS == 8 ? i0 : i0 / 2), w);
      }
    }
  }
  // A trailing partial block: the v1 path, by one warp.
  if (first_warp == 0 && full_blocks < p.num_blocks) {
    quantize_block<T, VEC, BITS>(p, full_blocks, lane);
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

// Code k (0-based) of a vector held in little-endian 32-bit words.
template <int BITS, int NW>
__device__ __forceinline__ int code_in(const uint32_t (&w)[NW], int k) {
  if constexpr (BITS == 8) {
    return static_cast<int8_t>(static_cast<uint8_t>(w[k / 4] >> (8 * (k % 4))));
  } else {
    // Nibble to the top, arithmetic shift back: two's complement as code_at.
    return static_cast<int32_t>(w[k / 8] << (28 - 4 * (k % 8))) >> 28;
  }
}

// Dequantize / W-row sum v2. A thread owns J vectors of VEC outputs (one 16-byte
// store each), vector base + j*32 + lane, so each warp store instruction writes
// 512 contiguous bytes as in v1. For each batch of RB rows it loads all RB*J
// code vectors and scales before adding, then adds rows in order 0..W-1 exactly
// as v1 (acc starts at +0, acc = acc + code * scale): bitwise the same sums.
// Bytes of codes in flight per thread per batch: RB*J*VEC (int8) or half that
// (int4), against 2-4 bytes in v1. bs_shift = log2(block_size) when that is a
// power of two (a shift instead of a 64-bit division per vector), else -1.
template <typename OutT, int BITS, int J, int RB>
__global__ void __launch_bounds__(kThreads, RB > 4 ? kMinBlocksV2 - 1 : kMinBlocksV2)
    dequantize_kernel_v2(DequantizeParams p, int bs_shift) {
  constexpr int VEC = 16 / sizeof(OutT);
  constexpr int kCodeBytes = BITS == 8 ? VEC : VEC / 2;
  constexpr int kWords = (kCodeBytes + 3) / 4;
  using CodeWord = typename Word<kCodeBytes>::type;
  const uint8_t* __restrict__ q = static_cast<const uint8_t*>(p.q);
  const float* __restrict__ scales = p.scales;
  OutT* __restrict__ out = static_cast<OutT*>(p.out);
  const int lane = threadIdx.x & 31;
  const int64_t warps_in_grid = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_vecs = p.n / VEC;

  for (int64_t base = first_warp * 32 * J; base < num_vecs; base += warps_in_grid * 32 * J) {
    bool live[J];
    int64_t i0[J], blk[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t v = base + j * 32 + lane;
      live[j] = v < num_vecs;
      i0[j] = v * VEC;
      blk[j] = bs_shift >= 0 ? i0[j] >> bs_shift : i0[j] / p.block_size;
    }
    float acc[J][VEC];
#pragma unroll
    for (int j = 0; j < J; ++j) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[j][k] = 0.0f;
    }
    for (int64_t w0 = 0; w0 < p.rows; w0 += RB) {
      uint32_t c[RB][J][kWords];
      float s[RB][J];
#pragma unroll
      for (int r = 0; r < RB; ++r) {
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const int64_t w = w0 + r;
          if (live[j] && w < p.rows) {
            const int64_t byte0 = BITS == 8 ? i0[j] : i0[j] / 2;
            words_of(__ldcs(reinterpret_cast<const CodeWord*>(q + w * p.q_row_stride + byte0)),
                     c[r][j]);
            s[r][j] = __ldg(scales + w * p.num_blocks + blk[j]);  // reused across the block: cached
          } else {
#pragma unroll
            for (int t = 0; t < kWords; ++t) c[r][j][t] = 0u;
            s[r][j] = 0.0f;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        if (w0 + r >= p.rows) break;  // uniform; never add a row that is not there
#pragma unroll
        for (int j = 0; j < J; ++j) {
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            acc[j][k] = __fadd_rn(acc[j][k],
                                  __fmul_rn(static_cast<float>(code_in<BITS>(c[r][j], k)), s[r][j]));
        }
      }
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
      if (!live[j]) continue;
      Vec<OutT, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = from_float<OutT>(acc[j][k]);
      uint4 bits;
      memcpy(&bits, &o, sizeof(bits));
      __stcs(reinterpret_cast<uint4*>(out + i0[j]), bits);
    }
  }
  // Tail: the last n % VEC elements, as v1.
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = num_vecs * VEC + tid; i < p.n; i += stride) {
    const int64_t blk = i / p.block_size;
    float acc = 0.0f;
    for (int64_t w = 0; w < p.rows; ++w) {
      acc = __fadd_rn(acc, __fmul_rn(static_cast<float>(code_at<BITS>(q + w * p.q_row_stride, i)),
                                     scales[w * p.num_blocks + blk]));
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

// v2 for block_size == 32 * VEC * NV; G = 4 / NV blocks per warp step, so every
// lane has four 16-byte loads in flight. Returns false when the shape does not fit.
template <typename T, int BITS>
bool launch_quantize_v2(const QuantizeParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (!aligned(p.x, 16)) return false;
  auto launch = [&](auto nv_tag) {
    constexpr int kNV = decltype(nv_tag)::value;
    constexpr int kG = 4 / kNV;
    const int64_t full_blocks = p.n / (32 * kVec * kNV);
    const int64_t warps = (full_blocks + kG - 1) / kG;
    quantize_kernel_v2<T, BITS, kNV, kG>
        <<<grid_size(warps * 32, kThreads), kThreads, 0, stream>>>(p);
  };
  if (p.block_size == 32 * kVec) launch(std::integral_constant<int, 1>{});
  else if (p.block_size == 64 * kVec) launch(std::integral_constant<int, 2>{});
  else if (p.block_size == 128 * kVec) launch(std::integral_constant<int, 4>{});
  else return false;
  return true;
}

template <typename T, int BITS>
cudaError_t launch_quantize(const QuantizeParams& p, cudaStream_t stream) {
  if (p.cuda_kernel == 2 && launch_quantize_v2<T, BITS>(p, stream)) return cudaGetLastError();
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
  if (p.cuda_kernel == 2 && fits(kMaxVec)) {
    // J = 2 vectors per thread and RB = 4 rows per batch: codes, scales and
    // accumulators fit in 64 registers without spills (J = 4 spilled for fp32
    // out). W >= 8 (fp32 out) gets 8-row batches, twice the loads in flight, at
    // 3 blocks per SM (85 registers) since 64 would spill.
    constexpr int kJ = 2;
    int bs_shift = -1;
    if ((p.block_size & (p.block_size - 1)) == 0) {
      bs_shift = 0;
      while ((int64_t{1} << bs_shift) < p.block_size) ++bs_shift;
    }
    const int64_t warps = (p.n / kMaxVec + 32 * kJ - 1) / (32 * kJ);
    const int64_t blocks = grid_size(warps * 32, kThreads);
    bool launched = false;
    if constexpr (sizeof(OutT) == 4) {  // the sums are always fp32
      if (p.rows >= 8) {
        dequantize_kernel_v2<OutT, BITS, kJ, 8><<<blocks, kThreads, 0, stream>>>(p, bs_shift);
        launched = true;
      }
    }
    if (!launched) {
      dequantize_kernel_v2<OutT, BITS, kJ, 4><<<blocks, kThreads, 0, stream>>>(p, bs_shift);
    }
  } else if (fits(kMaxVec)) launch(std::integral_constant<int, kMaxVec>{});
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
