// CUDA kernels of the GEMM family. No torch headers: the host glue
// (gemm_api.cpp) validates tensors and fills the params structs.
//
// bf16/fp16: tensor-core kernel (mma.sync m16n8k16, fp32 accumulators, sm_80+).
//   A CTA computes a BM x BN tile of out = a @ b^T; a [M, K] and b [N, K] are
//   both K-contiguous, so both operands go global -> shared with 16-byte
//   cp.async (kStages-deep pipeline) and shared -> registers with ldmatrix
//   (no transposes). Shared rows are 64 bytes (BK = 32); XOR-swizzling the
//   16-byte chunk index with (row / 2) % 4 makes every ldmatrix phase and every
//   cp.async store hit 8 distinct bank groups. Tail rows/columns/K chunks are
//   zero-filled by cp.async (src-size 0) and masked in the epilogue.
//   The epilogue adds bias and applies the activation in fp32 registers.
//   v2 (see mma_gemm_v2_kernel): 128 x 256 tiles, 8 warps of 64 x 64, 5-stage
//   pipeline in dynamic shared memory, double-buffered fragments. Same K order
//   per output element as v1, so the same results.
//   v3 (sm_90a, auto's choice where it can run; see wgmma_gemm_kernel): wgmma
//   from swizzled shared memory, 128 x 256 tiles in two warpgroups, 4 stages
//   filled by TMA (or cp.async).
// Grouped GEMM runs the same kernels: a CTA's row tile lies inside one group;
//   the grid covers ceil(M / BM) + groups row tiles (an upper bound, so offsets stay
//   on the device) and each CTA finds its group with a warp-wide prefix sum of
//   the groups' tile counts; surplus CTAs exit.
// fp32: a SIMT kernel (64 x 64 tiles, 4 x 4 outputs per thread), same tiling of rows.
// INT8: dp4a SIMT kernel with exact int32 accumulation; the scaling uses
//   __fmul_rn/__fadd_rn so it rounds exactly as the CPU kernel. The default
//   tensor-core kernel (v2, mma.sync m16n8k32 s8) gives the same bits.
// FP8 (e4m3, block scales): SIMT kernels that follow the contract in
//   gemm_params.h step by step (v1: bitwise equal to the CPU), tensor-core GEMMs
//   (v2, sm_89+: mma.sync m16n8k32 e4m3 on the v1 tiling, see
//   fp8_mma_gemm_kernel) and wgmma (v3, sm_90a, the default where it can run).
//   The grouped FP8 GEMM locates its row tiles as the grouped GEMM above does.
#include <cudaTypedefs.h>  // the tensor-map encoder's type (it comes through the runtime)
#include <cuda_fp8.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/kernel_choice.h"
#include "common/sm90.cuh"
#include "gemm/gemm_math.h"
#include "gemm/gemm_params.h"

namespace dsk::gemm {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBK = 32;                 // K per pipeline stage (64-byte shared rows)
constexpr int kChunksPerRow = kBK / 8;  // 16-byte chunks per shared row
constexpr int kStages = 3;              // 3 x (128 + 128) x 64 B = 48 KiB of static shared memory

// ---------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------


__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 8-bit operands run the 16-bit kernels' tiling on pairs of codes: the byte layout
// of m16n8k32's 8-bit A/B fragments is that of m16n8k16's 16-bit ones, so the same
// ldmatrix addresses feed it, each step covering 32 codes of K.
struct E4m3x2 {  // two FP8 e4m3 codes
  uint16_t bits;
};
struct S8x2 {  // two int8 codes
  uint16_t bits;
};

template <>
__device__ __forceinline__ void mma_16816<E4m3x2>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // never launched: fp8_gemm_cuda checks the kernel was built for sm_89+
#endif
}

// int32 accumulators (exact) carried in the float registers of the shared main
// loop as their bit patterns; zero is the same bits in both.
template <>
__device__ __forceinline__ void mma_16816<S8x2>(float (&d)[4], const uint32_t (&a)[4],
                                                const uint32_t (&b)[2]) {
  uint32_t c0 = __float_as_uint(d[0]), c1 = __float_as_uint(d[1]);
  uint32_t c2 = __float_as_uint(d[2]), c3 = __float_as_uint(d[3]);
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c0), "+r"(c1), "+r"(c2), "+r"(c3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  d[0] = __uint_as_float(c0);
  d[1] = __uint_as_float(c1);
  d[2] = __uint_as_float(c2);
  d[3] = __uint_as_float(c3);
}

// Element offset of 16-byte chunk `chunk` of shared row `row` (swizzled, see top).
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 3);
}

__device__ __forceinline__ void store_out(void* out, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(out)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(out)[i] = v; break;
  }
}

// Activation ACT (a compile-time constant, so the switch folds) on every accumulator.
template <Activation ACT, int MI, int NI>
__device__ __forceinline__ void activate_all(float (&acc)[MI][NI][4]) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = apply_activation(acc[mi][ni][r], ACT);
}

// out[row, col] = v0 and out[row, col + 1] = v1 where in bounds; one 4-byte
// store for 16-bit outputs when both are in bounds and the pair is aligned.
__device__ __forceinline__ void store_pair(const GemmParams& p, int64_t row, int64_t col, float v0,
                                           float v1) {
  const int64_t idx = row * p.n + col;
  const bool pair = col + 1 < p.n && (idx & 1) == 0;
  if (pair && p.out_dtype == DType::kBFloat16) {
    *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.out) + idx) =
        __floats2bfloat162_rn(v0, v1);
  } else if (pair && p.out_dtype == DType::kFloat16) {
    *reinterpret_cast<__half2*>(static_cast<__half*>(p.out) + idx) = __floats2half2_rn(v0, v1);
  } else {
    if (col < p.n) store_out(p.out, p.out_dtype, idx, v0);
    if (col + 1 < p.n) store_out(p.out, p.out_dtype, idx + 1, v1);
  }
}

// Epilogue shared by the tensor-core kernels: accumulator (mi, ni, r) of a
// warp tile at (warp_row0, warp_n0) is row lane/4 (+8 for r >= 2), column
// 2*(lane%4) + r%2 of its 16 x 8 mma tile. Bias and activation in registers
// first (the activation switch hoisted out of the loops, so they unroll and acc
// stays in registers), then the stores.
template <int MI, int NI>
__device__ __forceinline__ void mma_epilogue(const GemmParams& p, float (&acc)[MI][NI][4],
                                             int64_t warp_row0, int64_t row_end,
                                             int64_t warp_n0) {
  const int lane = threadIdx.x & 31;
  const int64_t warp_col0 = warp_n0 + (lane & 3) * 2;
  if (p.bias != nullptr) {
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int64_t col = warp_col0 + ni * 8;
      const float bias0 = col < p.n ? p.bias[col] : 0.0f;
      const float bias1 = col + 1 < p.n ? p.bias[col + 1] : 0.0f;
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        acc[mi][ni][0] += bias0;
        acc[mi][ni][1] += bias1;
        acc[mi][ni][2] += bias0;
        acc[mi][ni][3] += bias1;
      }
    }
  }
  switch (p.activation) {
    case Activation::kRelu: activate_all<Activation::kRelu>(acc); break;
    case Activation::kGelu: activate_all<Activation::kGelu>(acc); break;
    case Activation::kGeluTanh: activate_all<Activation::kGeluTanh>(acc); break;
    case Activation::kSilu: activate_all<Activation::kSilu>(acc); break;
    default: break;
  }
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = warp_row0 + mi * 16 + (lane >> 2) + half * 8;
      if (row < row_end) {
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          store_pair(p, row, warp_col0 + ni * 8, acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Row tiles: plain GEMM (one group) or grouped GEMM (per-CTA group lookup)
// ---------------------------------------------------------------------------

struct RowTile {
  int64_t row_begin = 0, row_end = 0, group = 0;
};

// P is GemmParams or Fp8GemmParams (the same m / offsets / offsets_int64 / groups).
template <typename P>
__device__ __forceinline__ int64_t clamped_offset(const P& p, int64_t g) {
  const int64_t v = p.offsets_int64 ? static_cast<const int64_t*>(p.offsets)[g]
                                    : static_cast<const int32_t*>(p.offsets)[g];
  return v < 0 ? 0 : (v > p.m ? p.m : v);
}

// Row range and group of row tile `tile`; false when the tile is past the last
// group's rows. Every thread of the CTA calls it (warp-collective).
template <int BM, typename P>
__device__ bool locate_row_tile(const P& p, int64_t tile, RowTile& out) {
  if (p.offsets == nullptr) {
    out.row_begin = tile * BM;
    out.row_end = min(out.row_begin + BM, p.m);
    out.group = 0;
    return out.row_begin < p.m;
  }
  const int lane = threadIdx.x & 31;
  int64_t tiles_before = 0;
  for (int64_t g0 = 0; g0 < p.groups; g0 += 32) {
    const int64_t g = g0 + lane;
    int64_t lo = 0, hi = 0;
    if (g < p.groups) {
      lo = clamped_offset(p, g);
      hi = max(lo, clamped_offset(p, g + 1));
    }
    const int64_t tiles = (hi - lo + BM - 1) / BM;
    int64_t inclusive = tiles;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int64_t v = __shfl_up_sync(kFullMask, inclusive, d);
      if (lane >= d) inclusive += v;
    }
    const int64_t first = tiles_before + inclusive - tiles;
    const unsigned hit = __ballot_sync(kFullMask, tiles > 0 && tile >= first && tile < first + tiles);
    if (hit) {
      const int src = __ffs(hit) - 1;
      const int64_t local = tile - __shfl_sync(kFullMask, first, src);
      const int64_t group_lo = __shfl_sync(kFullMask, lo, src);
      const int64_t group_hi = __shfl_sync(kFullMask, hi, src);
      out.group = g0 + src;
      out.row_begin = group_lo + local * BM;
      out.row_end = min(out.row_begin + BM, group_hi);
      return true;
    }
    tiles_before += __shfl_sync(kFullMask, inclusive, 31);
  }
  return false;
}

template <typename P>
__host__ __device__ __forceinline__ int64_t row_tiles(const P& p, int64_t bm) {
  // Grouped: each group's last tile may be partial, so at most ceil(M / BM) + groups tiles.
  return (p.m + bm - 1) / bm + (p.offsets != nullptr ? p.groups : 0);
}

// CTA `linear` -> (m_tile, n_tile), walking kRasterRows row tiles at a time
// down the columns: CTAs resident together share a few A row panels and B
// column panels in L2, instead of all CTAs of a wave sweeping every row of A.
constexpr int64_t kRasterRows = 8;
__device__ __forceinline__ void raster_order(int64_t linear, int64_t m_tiles, int64_t n_tiles,
                                             int64_t& m_tile, int64_t& n_tile) {
  const int64_t per_group = kRasterRows * n_tiles;
  const int64_t first_m = linear / per_group * kRasterRows;
  const int64_t rows = min(m_tiles - first_m, kRasterRows);
  const int64_t within = linear % per_group;
  m_tile = first_m + within % rows;
  n_tile = within / rows;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The CTA's (m_tile, n_tile) of BM x BN tiles in raster order, and its rank in
// its cluster: with kCluster (clusters of two along M) the pairs of m tiles
// 2i, 2i + 1 are rastered and rank r takes m tile 2i + r (past the last m tile
// when their count is odd).
template <bool kCluster, int BM, int BN, typename P>
__device__ __forceinline__ uint32_t cta_tile(const P& p, int64_t& m_tile, int64_t& n_tile) {
  if constexpr (kCluster) {
    const uint32_t rank = cluster_ctarank();
    int64_t pair;
    raster_order(blockIdx.x / 2, (row_tiles(p, BM) + 1) / 2, (p.n + BN - 1) / BN, pair, n_tile);
    m_tile = 2 * pair + rank;
    return rank;
  } else {
    raster_order(blockIdx.x, row_tiles(p, BM), (p.n + BN - 1) / BN, m_tile, n_tile);
    return 0;
  }
}

// A v3 stage by TMA (thread 0): arms the stage's mbarrier `bar` with the bytes
// landing in this CTA, then loads BM rows of A from row a_row (unless load_a:
// false for a cluster's CTA past M, whose A rows are never stored) to sa, and the
// BN rows of B from row b_row to sb; with kCluster this CTA loads B's half
// `rank` (tma_b's boxes are BN / 2 rows) into both CTAs of its cluster, and the
// other half comes from its peer. Rows are 128 bytes (64 bf16 or 128 FP8 codes
// of K, from k0).
template <bool kCluster, int BM, int BN>
__device__ __forceinline__ void tma_load_stage(uint32_t sa, uint32_t sb, uint32_t bar,
                                               const CUtensorMap& tma_a, const CUtensorMap& tma_b,
                                               int32_t k0, int64_t a_row, bool load_a, int64_t b_row,
                                               uint32_t rank) {
  constexpr int kRowBytes = 128;
  mbar_arrive_expect_tx(bar, (load_a ? BM + BN : BN) * kRowBytes);
  if (load_a) tma_load_2d(sa, &tma_a, k0, static_cast<int32_t>(a_row), bar);
  if constexpr (kCluster) {
    constexpr int kHalf = BN / 2;
    tma_load_2d_multicast(sb + rank * kHalf * kRowBytes, &tma_b, k0,
                          static_cast<int32_t>(b_row + rank * kHalf), bar, 0x3);
  } else {
    tma_load_2d(sb, &tma_b, k0, static_cast<int32_t>(b_row), bar);
  }
}
#endif

// ---------------------------------------------------------------------------
// Tensor-core kernel (bf16 / fp16)
// ---------------------------------------------------------------------------

template <int MI, int NI>
__device__ __forceinline__ void zero_accumulators(float (&acc)[MI][NI][4]) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
}

// v1 main loop: acc = a[rows of tile] @ b[n0, n0 + BN)^T over all of K, where k
// and the row strides count elements of T. After the mma of k tile kt it calls
// after_tile(kt): a no-op for bf16/fp16; the FP8 kernel folds its 128-wide
// block sums into its scaled accumulator there.
template <typename T, int BM, int BN, int WARPS_M, int WARPS_N, typename AfterTile>
__device__ __forceinline__ void mma_mainloop(const T* __restrict__ a, const T* __restrict__ b,
                                             int64_t k, const RowTile& tile, int64_t n0, int64_t n,
                                             T (&smem_a)[kStages][BM * kBK],
                                             T (&smem_b)[kStages][BN * kBK],
                                             float (&acc)[BM / WARPS_M / 16][BN / WARPS_N / 8][4],
                                             AfterTile after_tile) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int kWarpM = BM / WARPS_M, kWarpN = BN / WARPS_N;  // warp tile
  constexpr int MI = kWarpM / 16, NI = kWarpN / 8;             // mma tiles per warp
  static_assert(MI >= 1 && NI >= 2 && NI % 2 == 0, "warp tile must be 16m x 16n multiples");
  static_assert((BM * kChunksPerRow) % kThreads == 0 && (BN * kChunksPerRow) % kThreads == 0,
                "every thread copies the same number of chunks");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int64_t k_tiles = (k + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int64_t kt) {
    const int64_t k0 = kt * kBK;
#pragma unroll
    for (int c = tid; c < BM * kChunksPerRow; c += kThreads) {
      const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
      const int64_t grow = tile.row_begin + row, gk = k0 + chunk * 8;
      const bool valid = grow < tile.row_end && gk < k;  // K % 8 == 0: whole chunks
      cp_async_16(shared_addr(&smem_a[stage][swizzled(row, chunk)]),
                  valid ? a + grow * k + gk : a, valid);
    }
#pragma unroll
    for (int c = tid; c < BN * kChunksPerRow; c += kThreads) {
      const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
      const int64_t gn = n0 + row, gk = k0 + chunk * 8;
      const bool valid = gn < n && gk < k;
      cp_async_16(shared_addr(&smem_b[stage][swizzled(row, chunk)]),
                  valid ? b + gn * k + gk : b, valid);
    }
  };

  // Prologue: stages 0..kStages-2 in flight (one commit group each, possibly empty).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  zero_accumulators(acc);

  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    // Tile kt has landed once at most kStages - 2 newer groups are pending; the
    // barrier also tells every warp that stage (kt - 1) % kStages is free again.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_stage(static_cast<int>(next % kStages), next);
    cp_async_commit();

    const T* sa = smem_a[kt % kStages];
    const T* sb = smem_b[kt % kStages];
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t a_frag[MI][4], b_frag[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        // lanes 0-15: rows 0-15 at k 0-7; lanes 16-31: rows 0-15 at k 8-15 (a0..a3 order).
        const int row = warp_m * kWarpM + mi * 16 + (lane & 15);
        ldmatrix_x4(a_frag[mi], shared_addr(sa + swizzled(row, kk * 2 + (lane >> 4))));
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        // Four 8x8 matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
        const int row = warp_n * kWarpN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t r[4];
        ldmatrix_x4(r, shared_addr(sb + swizzled(row, kk * 2 + ((lane >> 3) & 1))));
        b_frag[2 * nj][0] = r[0];
        b_frag[2 * nj][1] = r[1];
        b_frag[2 * nj + 1][0] = r[2];
        b_frag[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_16816<T>(acc[mi][ni], a_frag[mi], b_frag[ni]);
    }
    after_tile(kt);
  }
  cp_async_wait<0>();
}

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32) mma_gemm_kernel(GemmParams p) {
  constexpr int kWarpM = BM / WARPS_M, kWarpN = BN / WARPS_N;
  __shared__ __align__(128) T smem_a[kStages][BM * kBK];
  __shared__ __align__(128) T smem_b[kStages][BN * kBK];

  int64_t m_tile, n_tile;
  raster_order(blockIdx.x, row_tiles(p, BM), (p.n + BN - 1) / BN, m_tile, n_tile);
  RowTile tile;
  if (!locate_row_tile<BM>(p, m_tile, tile)) return;  // CTA-uniform
  const int64_t n0 = n_tile * BN;
  const T* __restrict__ a = static_cast<const T*>(p.a);
  const T* __restrict__ b = static_cast<const T*>(p.b) + tile.group * p.n * p.k;

  float acc[kWarpM / 16][kWarpN / 8][4];
  mma_mainloop<T, BM, BN, WARPS_M, WARPS_N>(a, b, p.k, tile, n0, p.n, smem_a, smem_b, acc,
                                            [](int64_t) {});
  const int warp = threadIdx.x >> 5;
  mma_epilogue(p, acc, tile.row_begin + (warp / WARPS_N) * kWarpM, tile.row_end,
               n0 + (warp % WARPS_N) * kWarpN);
}

// ---------------------------------------------------------------------------
// Tensor-core kernel v2 (bf16 / fp16; see gemm_params.h for when it runs)
// ---------------------------------------------------------------------------
// Differences from v1, all aimed at feeding the tensor cores:
// - 128 x 256 CTA tile, 8 warps of 64 x 64: per 16-wide K step a warp issues
//   8 ldmatrix.x4 for 32 mma (v1's 64 x 32 warp tile: 6 for 16), so shared
//   memory bandwidth stops being the limit;
// - kStagesV2-deep cp.async pipeline in dynamic shared memory (the copy of
//   tile kt + kStagesV2 - 1 is issued at the top of iteration kt, so the
//   global latency is hidden behind kStagesV2 - 1 tiles of math);
// - register fragments double-buffered across K steps: the ldmatrix for step
//   s + 1 is issued before the mma of step s, and the one barrier per tile sits
//   between the last ldmatrix of a tile and the first of the next;
// - 1 CTA per SM (__launch_bounds__(256, 1)): 128 accumulators + 64 fragment
//   registers per thread.
// Same swizzle (64-byte rows, BK = 32), zero-filled tails and epilogue as v1.
constexpr int kStagesV2 = 5;  // 5 x (128 + 256) x 64 B = 120 KiB (fits sm_80's 163 KiB)
constexpr int kV2BM = 128, kV2BN = 256, kV2WarpsM = 2, kV2WarpsN = 4;
constexpr int kV2Threads = kV2WarpsM * kV2WarpsN * 32;
constexpr int kV2SmemBytes = kStagesV2 * (kV2BM + kV2BN) * kBK * 2;

template <typename T>
__global__ void __launch_bounds__(kV2Threads, 1) mma_gemm_v2_kernel(GemmParams p) {
  constexpr int BM = kV2BM, BN = kV2BN;
  constexpr int kWarpM = BM / kV2WarpsM, kWarpN = BN / kV2WarpsN;  // 64 x 64
  constexpr int MI = kWarpM / 16, NI = kWarpN / 8;                 // 4 x 8 mma tiles
  constexpr int KSTEPS = kBK / 16;                                 // 2 mma K steps per tile
  constexpr int kStageElems = (BM + BN) * kBK;                     // A rows, then B rows
  constexpr int kAChunks = BM * kChunksPerRow / kV2Threads;        // 2 per thread
  constexpr int kBChunks = BN * kChunksPerRow / kV2Threads;        // 4 per thread
  static_assert(KSTEPS % 2 == 0, "fragment buffer index must restart at 0 every tile");
  static_assert(kAChunks * kV2Threads == BM * kChunksPerRow &&
                kBChunks * kV2Threads == BN * kChunksPerRow, "even copy split");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  int64_t m_tile, n_tile;
  raster_order(blockIdx.x, row_tiles(p, BM), (p.n + BN - 1) / BN, m_tile, n_tile);
  RowTile tile;
  if (!locate_row_tile<BM>(p, m_tile, tile)) return;  // CTA-uniform
  const int64_t m0 = tile.row_begin, n0 = n_tile * BN;
  const T* __restrict__ a = static_cast<const T*>(p.a);
  const T* __restrict__ b = static_cast<const T*>(p.b) + tile.group * p.n * p.k;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kV2WarpsN, warp_n = warp % kV2WarpsN;
  const int64_t k_tiles = (p.k + kBK - 1) / kBK;

  // Copy assignment: chunk c = tid + i * threads is row c / 4, 16-byte chunk c % 4,
  // so a thread always copies the same chunk column, rows 64 apart.
  const int copy_chunk = tid % kChunksPerRow, copy_row = tid / kChunksPerRow;
  constexpr int kCopyRowStep = kV2Threads / kChunksPerRow;  // 64
  const uint32_t smem_base = shared_addr(smem);

  auto load_stage = [&](int stage, int64_t kt) {
    const int64_t gk = kt * kBK + copy_chunk * 8;
    const bool k_ok = gk < p.k;  // K % 8 == 0: whole chunks
    const uint32_t stage_base = smem_base + stage * kStageElems * 2;
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int row = copy_row + i * kCopyRowStep;
      const int64_t grow = m0 + row;
      const bool valid = k_ok && grow < tile.row_end;
      cp_async_16(stage_base + swizzled(row, copy_chunk) * 2, valid ? a + grow * p.k + gk : a,
                  valid);
    }
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) {
      const int row = copy_row + i * kCopyRowStep;
      const int64_t gn = n0 + row;
      const bool valid = k_ok && gn < p.n;
      cp_async_16(stage_base + swizzled(BM + row, copy_chunk) * 2,
                  valid ? b + gn * p.k + gk : b, valid);
    }
  };

  // ldmatrix source addresses (bytes, within a stage). Warp tile rows start at
  // multiples of 16 and the swizzle only looks at row bits 1-2, so the XOR
  // term depends on the lane alone.
  // A, x4 per mi: lanes 0-15 rows 0-15 at k 0-7, lanes 16-31 the same rows at k 8-15.
  const int a_row = warp_m * kWarpM + (lane & 15);
  // B, x4 per pair of n8 tiles: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
  const int b_row = BM + warp_n * kWarpN + (lane & 7) + ((lane >> 4) << 3);
  uint32_t a_off[KSTEPS], b_off[KSTEPS];
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s) {
    a_off[s] = swizzled(a_row, s * 2 + (lane >> 4)) * 2;
    b_off[s] = swizzled(b_row, s * 2 + ((lane >> 3) & 1)) * 2;
  }

  uint32_t a_frag[2][MI][4], b_frag[2][NI][2];
  auto load_frags = [&](int buf, int stage, int s) {
    const uint32_t base = smem_base + stage * kStageElems * 2;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
      ldmatrix_x4(a_frag[buf][mi], base + a_off[s] + mi * 16 * kBK * 2);
#pragma unroll
    for (int nj = 0; nj < NI / 2; ++nj) {
      uint32_t r[4];
      ldmatrix_x4(r, base + b_off[s] + nj * 16 * kBK * 2);
      b_frag[buf][2 * nj][0] = r[0];
      b_frag[buf][2 * nj][1] = r[1];
      b_frag[buf][2 * nj + 1][0] = r[2];
      b_frag[buf][2 * nj + 1][1] = r[3];
    }
  };

  // Prologue: tiles 0..kStagesV2-2 in flight (one commit group each, possibly empty).
#pragma unroll
  for (int s = 0; s < kStagesV2 - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  float acc[MI][NI][4];
  zero_accumulators(acc);

  // Tile 0 landed (at most kStagesV2 - 2 newer groups pending) and visible to all.
  cp_async_wait<kStagesV2 - 2>();
  __syncthreads();
  load_frags(0, 0, 0);

  int stage = 0;  // kt % kStagesV2
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    // Refill the slot of tile kt - 1: every warp read it last before the
    // barrier that ended iteration kt - 1.
    const int64_t next = kt + kStagesV2 - 1;
    const int next_stage = stage == 0 ? kStagesV2 - 1 : stage - 1;
    if (next < k_tiles) load_stage(next_stage, next);
    cp_async_commit();
    const int stage_after = stage + 1 == kStagesV2 ? 0 : stage + 1;
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) {
      if (s == KSTEPS - 1) {
        // Tile kt + 1 landed (groups up to kt + kStagesV2 - 1 committed); the
        // barrier also retires this tile's slot for the refill above next time.
        cp_async_wait<kStagesV2 - 2>();
        __syncthreads();
      }
      // Fragments of the next K step (the next tile's first one at the end;
      // past the last tile it reads stale shared memory that is never used).
      if (s == KSTEPS - 1) {
        load_frags((s + 1) & 1, stage_after, 0);
      } else {
        load_frags((s + 1) & 1, stage, s + 1);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
          mma_16816<T>(acc[mi][ni], a_frag[s & 1][mi], b_frag[s & 1][ni]);
    }
    stage = stage_after;
  }
  cp_async_wait<0>();

  mma_epilogue(p, acc, m0 + warp_m * kWarpM, tile.row_end, n0 + warp_n * kWarpN);
}

// ---------------------------------------------------------------------------
// Tensor-core kernel v3 (bf16 / fp16 on sm_90a: wgmma; plain and grouped GEMMs)
// ---------------------------------------------------------------------------
// - 128 x 256 CTA tile: two warpgroups, each 64 rows x 256 columns with one
//   wgmma.m64n256k16 per 16 of K (128 fp32 accumulators per thread);
// - A [BM][64] and B [BN][64] K-major in shared memory in the 128-byte swizzled
//   layout wgmma reads through matrix descriptors: a row is 64 K values (128 B),
//   16-byte chunk c of row r sits at chunk c ^ (r % 8), 8 rows form a 1024-byte
//   atom (the descriptors' stride byte offset); K steps of 16 advance the
//   descriptors' start address by 32 bytes;
// - all 256 threads copy with cp.async, kStagesV3 stages, two tiles ahead;
//   after a stage lands each thread fences the async proxy (wgmma reads shared
//   memory through it) and a barrier publishes the stage; a tile's four wgmma
//   stay in flight while the next tile's are issued (wait_group 1), so the
//   tensor cores are not idle across the barrier; a stage is refilled two
//   tiles after its wgmma were issued, when every warpgroup has waited for them;
// - the accumulators' layout per warp is mma.sync's 16 x 8 one, so the shared
//   epilogue stores them.
constexpr int kV3BM = 128, kV3BN = 256, kV3BK = 64, kStagesV3 = 4, kV3Threads = 256;
constexpr int kV3RowBytes = kV3BK * 2;                              // 128
constexpr int kV3StageBytes = (kV3BM + kV3BN) * kV3RowBytes;        // 48 KiB
constexpr int kV3SmemBytes = kStagesV3 * kV3StageBytes + 1024;      // + room to align to 1 KiB
// The descriptors assume every operand tile starts a 128-byte swizzle atom
// (1 KiB aligned, base offset 0) and a K step stays inside its 128-byte row.
static_assert(kV3RowBytes == 128 && kV3StageBytes % 1024 == 0 && (64 * kV3RowBytes) % 1024 == 0 &&
              (kV3BM * kV3RowBytes) % 1024 == 0, "v3 tiles must sit on 1 KiB swizzle atoms");
static_assert(kV3SmemBytes <= 227 * 1024, "v3 shared memory exceeds sm_90's per-block limit");


#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// One warpgroup's wgmma of a v3 K tile, one commit group: its 64 rows (sa) times
// the tile's B (sb), 64 of K in four K steps.
template <typename T>
__device__ __forceinline__ void issue_v3_tile(float (&acc)[1][kV3BN / 8][4], uint32_t sa, uint32_t sb) {
  pin_accumulators(acc);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kV3BK / 16; ++ks)
    wgmma_m64n256k16<T>(acc, wgmma_desc(sa + ks * 32), wgmma_desc(sb + ks * 32));
  wgmma_commit();
}
#endif

// kTma: the stages are filled by TMA (thread 0 issues two 2-D tile loads per
// stage; tensor maps of a [M, K] and b [groups * N, K] with 64 x rows boxes in
// the 128-byte swizzle, so shared memory holds exactly the layout above; rows and
// K past the tensors are zero-filled; a grouped tile's rows past its group read
// the next group's rows, which the epilogue never stores) and each stage's
// mbarrier says when it landed. Otherwise all threads copy with cp.async.
//
// kCluster (with kTma; plain GEMMs; opt-in DSK_GEMM_CLUSTER=1, tested on an
// H100): CTAs in clusters of two along M, the same n tile and m tiles 2i, 2i + 1.
// Each CTA loads its A tile and one half (128 rows) of the B tile they share,
// multicast into both CTAs' stage (tma_b's boxes are 128 rows), so the pair reads
// B from L2 once: 32 KiB per CTA and K tile instead of 48. Each stage's mbarrier
// still counts all 48 KiB landing in its CTA (the peer's half may land before
// this CTA arms it: the transaction count may go below zero, the phase waits
// for the arming arrival). A stage is refilled only when both CTAs finished
// reading it: the cluster barrier's arrive (after wait_group 1 of tile kt - 1,
// which leaves tile kt - 2 done) and wait (before tile kt + 2's loads) replace
// the CTA barrier. A CTA whose m tile lies past M (an odd count of m tiles)
// still loads its half of B and synchronizes, but loads no A and stores nothing;
// the last wait keeps either CTA from exiting while the other may still
// multicast into it.
//
// kDeep (with kTma; opt-in DSK_GEMM_DEEP_PREFETCH=1, tested on an H100): the
// copies run kStagesV3 - 1 tiles ahead instead of kStagesV3 - 2. The stage
// refilled in iteration kt is tile kt - 1's, after this iteration's wait_group 1
// (tile kt - 1 done) and a barrier (the cluster's with kCluster) that says every
// warpgroup got there; tile kt's wgmma run across that barrier. Each load then
// has three tiles' worth of MMA time to land instead of two.
template <typename T, bool kTma, bool kCluster, bool kDeep>
__device__ __forceinline__ void wgmma_gemm_body(const GemmParams& p, const CUtensorMap& tma_a,
                                                const CUtensorMap& tma_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(kTma || !(kCluster || kDeep), "the cluster and deep variants load with TMA");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t stage_full[kStagesV3];  // TMA only
  const uint32_t smem_base = (shared_addr(smem_raw) + 1023u) & ~1023u;

  int64_t m_tile, n_tile;
  const uint32_t rank = cta_tile<kCluster, kV3BM, kV3BN>(p, m_tile, n_tile);  // rank in the cluster
  RowTile tile;
  // CTA-uniform; a cluster's CTA past M stays (see above): its row range is empty.
  if (!locate_row_tile<kV3BM>(p, m_tile, tile) && !kCluster) return;
  const int64_t m0 = kCluster ? m_tile * kV3BM : tile.row_begin, n0 = n_tile * kV3BN;
  const T* __restrict__ a = static_cast<const T*>(p.a);
  const T* __restrict__ b = static_cast<const T*>(p.b) + tile.group * p.n * p.k;
  const int tid = threadIdx.x, warpgroup = tid / 128, warp_in_group = (tid % 128) / 32;
  const int64_t k_tiles = (p.k + kV3BK - 1) / kV3BK;
  // A warpgroup whose 64 rows all lie past the tile's rows (a group's short last
  // tile) issues no wgmma with p.v3_skip_empty_rows: the other one then has the
  // tensor cores to itself. Warpgroup-uniform; it still copies and synchronizes.
  const bool wg_rows = !p.v3_skip_empty_rows || m0 + warpgroup * 64 < tile.row_end;

  // Stage `stage` <- K tile kt: cp.async by every thread (K % 8 == 0: whole
  // chunks), or TMA by thread 0 (the caller), completing the stage's mbarrier.
  auto load_stage = [&](int stage, int64_t kt) {
    const uint32_t sa = smem_base + stage * kV3StageBytes, sb = sa + kV3BM * kV3RowBytes;
    if constexpr (kTma) {
      static_assert(kV3RowBytes == 128 && kV3StageBytes == (kV3BM + kV3BN) * 128, "tma_load_stage's rows");
      tma_load_stage<kCluster, kV3BM, kV3BN>(sa, sb, shared_addr(&stage_full[stage]), tma_a, tma_b,
                                             static_cast<int32_t>(kt * kV3BK), m0, !kCluster || m0 < p.m,
                                             tile.group * p.n + n0, rank);
    } else {
      const int64_t k_bytes = p.k * 2, k0 = kt * kV3RowBytes;
      load_swizzled_rows<kV3BM, kV3Threads>(sa, a, m0, tile.row_end, k0, k_bytes, k_bytes);
      load_swizzled_rows<kV3BN, kV3Threads>(sb, b, n0, p.n, k0, k_bytes, k_bytes);
    }
  };
  if constexpr (kTma) init_stage_barriers(stage_full, tid);
  if constexpr (kCluster) cluster_sync();  // both CTAs' barriers exist before either multicasts

  // Copies run kV3Prefetch tiles ahead; the wgmma of a tile stays in flight
  // while the next tile's are issued (wait_group 1), so the stage being
  // refilled is the one read two tiles ago (kDeep: one tile ago, see above).
  constexpr int kV3Prefetch = kDeep ? kStagesV3 - 1 : kStagesV3 - 2;
#pragma unroll
  for (int s = 0; s < kV3Prefetch; ++s) {
    if constexpr (kTma) {
      if (tid == 0 && s < k_tiles) load_stage(s, s);
    } else {
      if (s < k_tiles) load_stage(s, s);
      cp_async_commit();
    }
  }
  float acc[1][kV3BN / 8][4];
  zero_accumulators(acc);
  if constexpr (kCluster && !kDeep) cluster_arrive();  // nothing read yet: tile 0's wait passes

  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    if constexpr (kTma) {
      // Every warpgroup passed wait_group 1 of tile kt - 1 before this barrier
      // (the cluster's: of both CTAs), so the wgmma of tile kt - 2 are done and
      // its stage can be refilled; tile kt is there once its stage's mbarrier
      // completes phase kt / kStagesV3.
      if constexpr (!kDeep) {
        if constexpr (kCluster) {
          cluster_wait();
        } else {
          __syncthreads();
        }
        if (tid == 0 && kt + kV3Prefetch < k_tiles)
          load_stage(static_cast<int>((kt + kV3Prefetch) % kStagesV3), kt + kV3Prefetch);
      }
      wait_stage(stage_full, kt);
    } else {
      // Tile kt landed (at most kV3Prefetch - 1 newer groups pending); the fence
      // hands this thread's copies to the async proxy, the barrier everyone's.
      // Every warpgroup passed wait_group 1 of tile kt - 1 before this barrier,
      // so the wgmma of tile kt - 2 are done and its stage can be refilled.
      cp_async_wait<kV3Prefetch - 1>();
      fence_proxy_async();
      __syncthreads();
    }

    const uint32_t stage = smem_base + static_cast<uint32_t>(kt % kStagesV3) * kV3StageBytes;
    const uint32_t sa = stage + warpgroup * 64 * kV3RowBytes, sb = stage + kV3BM * kV3RowBytes;
    if (wg_rows) issue_v3_tile<T>(acc, sa, sb);
    if constexpr (!kTma) {
      // The copies are issued while this tile's wgmma run (the stage they refill
      // is not read by any wgmma in flight).
      const int64_t next = kt + kV3Prefetch;
      if (next < k_tiles) load_stage(static_cast<int>(next % kStagesV3), next);
      cp_async_commit();
    }
    wgmma_wait<1>();
    pin_accumulators(acc);
    if constexpr (kDeep) {
      // Tile kt - 1 done in every warpgroup (of both CTAs) past the barrier:
      // its stage takes tile kt + kV3Prefetch.
      if constexpr (kCluster) {
        cluster_sync();
      } else {
        __syncthreads();
      }
      if (tid == 0 && kt + kV3Prefetch < k_tiles)
        load_stage(static_cast<int>((kt + kV3Prefetch) % kStagesV3), kt + kV3Prefetch);
    } else if constexpr (kCluster) {
      cluster_arrive();  // tile kt - 1 read here: its stage may be refilled
    }
  }
  wgmma_wait<0>();
  pin_accumulators(acc);
  if constexpr (!kTma) cp_async_wait<0>();
  if constexpr (kCluster) {  // the peer is done with every multicast into this CTA
    if constexpr (kDeep) cluster_arrive();
    cluster_wait();
  }

  mma_epilogue(p, acc, m0 + warpgroup * 64 + warp_in_group * 16, tile.row_end, n0);
#endif
}

// kCluster instances are launched in clusters of two (launch_tile_grid).
template <typename T, bool kTma, bool kCluster, bool kDeep>
__global__ void __launch_bounds__(kV3Threads, 1)
    wgmma_gemm_kernel(GemmParams p, const __grid_constant__ CUtensorMap tma_a,
                      const __grid_constant__ CUtensorMap tma_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  wgmma_gemm_body<T, kTma, kCluster, kDeep>(p, tma_a, tma_b);
#else
  __trap();  // never launched: launch_wgmma checks the kernel was built for sm_90a
#endif
}

// FP8 on Hopper tensor cores (v3, sm_90a; the default where it can run):
// wgmma.m64n128k32 e4m3, DeepSeek-V3's recipe as DeepGEMM runs it. A 128 x 128
// CTA tile in two warpgroups (64 rows x 128 columns each); a stage is one
// 128-wide scale block of K (a 128-byte row per operand row, the 128-byte
// swizzle of v3 above), summed by 4 wgmma into `part` (the first overwrites it),
// then folded into the fp32 accumulator as acc += (part * a_scale) * w_scale (the
// CTA's 128 columns share one w scale). Grouped row tiles as the other kernels.
constexpr int kF8BM = 128, kF8BN = 128, kStagesF8 = 5, kF8Threads = 256;
constexpr int kF8RowBytes = 128;  // = kFp8Block codes
constexpr int kF8StageBytes = (kF8BM + kF8BN) * kF8RowBytes;    // 32 KiB
constexpr int kF8SmemBytes = kStagesF8 * kF8StageBytes + 1024;  // + room to align to 1 KiB
static_assert(kF8RowBytes == 128 && kF8StageBytes % 1024 == 0 && (64 * kF8RowBytes) % 1024 == 0 &&
              (kF8BM * kF8RowBytes) % 1024 == 0, "FP8 v3 tiles must sit on 1 KiB swizzle atoms");
static_assert(kF8SmemBytes <= 227 * 1024, "FP8 v3 shared memory exceeds sm_90's per-block limit");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// One warpgroup's wgmma of an FP8 K block, one commit group: part = its 64 rows
// (sa) times the tile's W (sb) over the block's 128 codes of K (the first of the
// four K steps overwrites part).
__device__ __forceinline__ void issue_fp8_block(float (&part)[1][kF8BN / 8][4], uint32_t sa, uint32_t sb) {
  pin_accumulators(part);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kFp8Block / 32; ++ks)
    wgmma_m64n128k32_e4m3(part, wgmma_desc(sa + ks * 32), wgmma_desc(sb + ks * 32), ks > 0);
  wgmma_commit();
}

// The promotion of a block's sums (gemm_params.h's contract):
// acc += (part * a_scale of the row) * w_scale, a_scale[0] for accumulators 0-1
// (row lane / 4), a_scale[1] for 2-3 (row lane / 4 + 8). kFma: with one fused
// operation instead (Fp8GemmParams::v3_fma_promotion), acc = fma(part, a_scale *
// w_scale, acc).
template <bool kFma = false>
__device__ __forceinline__ void promote_fp8_block(float (&acc)[1][kF8BN / 8][4],
                                                  const float (&part)[1][kF8BN / 8][4],
                                                  const float (&a_scale)[2], float w_scale) {
  const float fused[2] = {kFma ? __fmul_rn(a_scale[0], w_scale) : 0.0f,
                          kFma ? __fmul_rn(a_scale[1], w_scale) : 0.0f};
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int ni = 0; ni < kF8BN / 8; ++ni)
#pragma unroll
      for (int j = 2 * half; j < 2 * half + 2; ++j)
        acc[0][ni][j] = kFma ? __fmaf_rn(part[0][ni][j], fused[half], acc[0][ni][j])
                             : __fadd_rn(acc[0][ni][j], __fmul_rn(__fmul_rn(part[0][ni][j], a_scale[half]), w_scale));
}
#endif

// kTma: the stages are filled by TMA as in v3 (thread 0 issues both tile loads of
// a stage, 128-byte boxes of codes in the 128-byte swizzle, and the stage's
// mbarrier says when they landed; rows past the tensors are zero-filled, a
// grouped tile's rows past its group read the next group's, never stored).
// Otherwise every thread copies with cp.async.
//
// kDeep (with kTma; opt-in DSK_FP8_DEEP_PREFETCH=1, tested on an H100): all
// kStagesF8 stages are filled ahead, and a block's stage is refilled (with block
// kb + kStagesF8) as soon as its promotion has waited for its wgmma and a barrier
// says every warpgroup did, instead of two blocks later. kCluster (with kDeep;
// plain GEMMs; DSK_FP8_CLUSTER=1, tested on an H100): clusters of two CTAs
// along M multicasting the W tile they share, as bf16 v3's kCluster (each loads
// 64 of its 128 rows into both CTAs; the barrier is the cluster's; a CTA past M
// loads no A and stores nothing).
template <bool kTma, bool kDeep, bool kCluster>
__device__ __forceinline__ void fp8_wgmma_gemm_body(const Fp8GemmParams& p, const CUtensorMap& tma_a,
                                                    const CUtensorMap& tma_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert((kTma || !kDeep) && (kDeep || !kCluster), "deep needs TMA, cluster needs deep");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t stage_full[kStagesF8];  // TMA only
  const uint32_t smem_base = (shared_addr(smem_raw) + 1023u) & ~1023u;

  int64_t m_tile, n_tile;
  const uint32_t rank = cta_tile<kCluster, kF8BM, kF8BN>(p, m_tile, n_tile);  // rank in the cluster
  RowTile tile;
  // CTA-uniform; a cluster's CTA past M stays: its row range is empty.
  if (!locate_row_tile<kF8BM>(p, m_tile, tile) && !kCluster) return;
  const int64_t n0 = n_tile * kF8BN;
  const uint8_t* __restrict__ a = p.a;
  const uint8_t* __restrict__ b = p.w + tile.group * p.n * p.k;
  const float* __restrict__ w_scales =
      p.w_scales + (tile.group * ((p.n + kFp8Block - 1) / kFp8Block) + n0 / kFp8Block) * p.k_blocks;
  const int tid = threadIdx.x, warpgroup = tid / 128, lane = tid & 31;
  const int64_t warp_row0 = tile.row_begin + warpgroup * 64 + ((tid % 128) / 32) * 16;

  // Stage `stage` <- K block kb: cp.async by every thread (K % 16 == 0: whole
  // chunks), or TMA by thread 0 (the caller), completing the stage's mbarrier.
  auto load_stage = [&](int stage, int64_t kb) {
    const uint32_t sa = smem_base + stage * kF8StageBytes, sb = sa + kF8BM * kF8RowBytes;
    if constexpr (kTma) {
      static_assert(kF8RowBytes == 128 && kF8StageBytes == (kF8BM + kF8BN) * 128, "tma_load_stage's rows");
      tma_load_stage<kCluster, kF8BM, kF8BN>(sa, sb, shared_addr(&stage_full[stage]), tma_a, tma_b,
                                             static_cast<int32_t>(kb * kFp8Block), tile.row_begin,
                                             !kCluster || tile.row_begin < p.m, tile.group * p.n + n0,
                                             rank);
    } else {
      load_swizzled_rows<kF8BM, kF8Threads>(sa, a, tile.row_begin, tile.row_end, kb * kFp8Block, p.k, p.k);
      load_swizzled_rows<kF8BN, kF8Threads>(sb, b, n0, p.n, kb * kFp8Block, p.k, p.k);
    }
  };
  if constexpr (kTma) init_stage_barriers(stage_full, tid);
  if constexpr (kCluster) cluster_sync();  // both CTAs' barriers exist before either multicasts

  // Two partial-sum buffers: block kb's wgmma run into one while block kb - 1's
  // sums (the other, complete after wait_group 1) are scaled into acc; the
  // promotion order (kb ascending) is unchanged. part0 holds the even blocks,
  // part1 the odd ones, and every loop iteration starts and ends with part0's
  // wgmma in flight: ptxas keeps the wgmma asynchronous only when the in-flight
  // set is the same around the loop (a loop body that alternates it is
  // serialized: C7514). A stage is refilled kF8Prefetch blocks ahead, two blocks
  // after its wgmma were issued, when every warpgroup has waited for them.
  // (On an H100 with cp.async loads this ran as fast as waiting for each block's
  // wgmma before its promotion: the loads bound that variant.)
  constexpr int kF8Prefetch = kDeep ? kStagesF8 : kStagesF8 - 2;
#pragma unroll
  for (int s = 0; s < kF8Prefetch; ++s) {
    if constexpr (kTma) {
      if (tid == 0 && s < p.k_blocks) load_stage(s, s);
    } else {
      if (s < p.k_blocks) load_stage(s, s);
      cp_async_commit();
    }
  }
  // part0/part1 need no zeroing: a block's first wgmma overwrites them (scale-d 0).
  float part0[1][kF8BN / 8][4], part1[1][kF8BN / 8][4], acc[1][kF8BN / 8][4];
  zero_accumulators(acc);
  float scale0[3], scale1[3];  // a scales of the thread's two rows, then the w scale

  // Block kb: wait for its stage, read its scales, issue its wgmma into `part`,
  // and refill block kb - 2's stage while they run.
  auto begin_block = [&](int64_t kb, float (&part)[1][kF8BN / 8][4], float (&scale)[3]) {
    const int64_t next = kb + kF8Prefetch;
    if constexpr (kTma) {
      // Every warpgroup waited for block kb - 2's wgmma before this barrier; block
      // kb is there once its stage's mbarrier completes phase kb / kStagesF8.
      if constexpr (!kDeep) {
        __syncthreads();
        if (tid == 0 && next < p.k_blocks) load_stage(static_cast<int>(next % kStagesF8), next);
      }
      wait_stage(stage_full, kb);
    } else {
      cp_async_wait<kF8Prefetch - 1>();  // as v3: block kb landed, handed to the async proxy
      fence_proxy_async();
      __syncthreads();
    }
    // Requested before the wgmma so their latency hides behind them.
    scale[2] = w_scales[kb];
#pragma unroll
    for (int half = 0; half < 2; ++half)
      scale[half] = p.a_scales[min(warp_row0 + (lane >> 2) + half * 8, tile.row_end - 1) * p.k_blocks + kb];
    const uint32_t stage = smem_base + static_cast<uint32_t>(kb % kStagesF8) * kF8StageBytes;
    const uint32_t sa = stage + warpgroup * 64 * kF8RowBytes, sb = stage + kF8BM * kF8RowBytes;
    issue_fp8_block(part, sa, sb);
    if constexpr (!kTma) {
      if (next < p.k_blocks) load_stage(static_cast<int>(next % kStagesF8), next);
      cp_async_commit();
    }
  };
  // acc += (part * a_scale) * w_scale once `part`'s wgmma (block kb) are done
  // (`wait` may leave the newer block's pending); kDeep: then block kb's stage
  // takes block kb + kStagesF8, once every warpgroup got here.
  auto promote = [&](auto wait, float (&part)[1][kF8BN / 8][4], const float (&scale)[3], int64_t kb) {
    wait();
    pin_accumulators(part);
    if constexpr (kDeep) {
      if constexpr (kCluster) {
        cluster_sync();
      } else {
        __syncthreads();
      }
      if (tid == 0 && kb + kStagesF8 < p.k_blocks)
        load_stage(static_cast<int>(kb % kStagesF8), kb + kStagesF8);
    }
    promote_fp8_block(acc, part, {scale[0], scale[1]}, scale[2]);
  };
  const auto wait_older = [] { wgmma_wait<1>(); };
  const auto wait_all = [] { wgmma_wait<0>(); };
  if (p.k_blocks > 0) {
    begin_block(0, part0, scale0);
    int64_t kb = 1;
    for (; kb + 1 < p.k_blocks; kb += 2) {
      begin_block(kb, part1, scale1);
      promote(wait_older, part0, scale0, kb - 1);
      begin_block(kb + 1, part0, scale0);
      promote(wait_older, part1, scale1, kb);
    }
    if (kb < p.k_blocks) {  // an even number of blocks: the last is odd
      begin_block(kb, part1, scale1);
      promote(wait_older, part0, scale0, kb - 1);
      promote(wait_all, part1, scale1, kb);
    } else {
      promote(wait_all, part0, scale0, kb - 1);
    }
  }
  if constexpr (!kTma) cp_async_wait<0>();
  if constexpr (kCluster) cluster_sync();  // the peer is done with every multicast into this CTA

  GemmParams out;  // the shared epilogue's view: plain stores
  out.out = p.out;
  out.out_dtype = p.out_dtype;
  out.m = p.m;
  out.n = p.n;
  mma_epilogue(out, acc, warp_row0, tile.row_end, n0);
#endif
}

// kCluster instances are launched in clusters of two (launch_tile_grid).
template <bool kTma, bool kDeep, bool kCluster>
__global__ void __launch_bounds__(kF8Threads, 1)
    fp8_wgmma_gemm_kernel(Fp8GemmParams p, const __grid_constant__ CUtensorMap tma_a,
                          const __grid_constant__ CUtensorMap tma_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  fp8_wgmma_gemm_body<kTma, kDeep, kCluster>(p, tma_a, tma_b);
#else
  __trap();  // never launched: launch_fp8_wgmma checks the kernel was built for sm_90a
#endif
}

// ---------------------------------------------------------------------------
// Warp-specialized persistent v3 (sm_90a; bf16/fp16 and FP8, plain and grouped;
// DSK_GEMM_WARP_SPECIALIZED=1 / FP8's default, with DSK_*_CLUSTER=1 in clusters
// of two; tested on an H100)
// ---------------------------------------------------------------------------
// Three warpgroups. Warpgroup 0 produces: one thread issues every TMA copy.
// Warpgroups 1 and 2 consume: each computes 64 rows of the CTA tile exactly as
// one of v3's two warpgroups does (same operands, K order, promotion and
// epilogue), so the outputs are v3's bits. What changes is the synchronization:
// - no CTA barrier in the main loop. Each stage has two mbarriers: `full` (the
//   producer arms it with the stage's bytes, TMA completes it) and `empty`
//   (every consumer thread arrives once the wgmma that read the stage are
//   done; with p.v3_ws_warp_arrivals each consumer warp once: 8 arrivals a
//   stage instead of 256 on one word). The producer refills a stage as soon as the consumers released it,
//   up to kStages tiles ahead, and the consumers never wait for each other: in
//   FP8 one warpgroup's promotion runs while the other's wgmma hold the tensor
//   cores;
// - persistent: min(tiles, SMs) CTAs walk the raster order with stride
//   gridDim.x; the stage counter runs on across tiles, so the producer streams
//   the next tile's stages while the consumers store the last one;
// - the producer warpgroup hands registers to the consumers (setmaxnreg).
// kCluster (plain GEMMs): clusters of two CTAs along M walk pairs of m tiles
// (2i, 2i + 1, the same n tile) in lockstep; each producer copies its A tile and
// one half of the B tile into both CTAs' stage (multicast, as v3's kCluster), so
// a stage of either CTA is refilled by both producers: its `empty` barrier counts
// the consumer threads (warps) of both CTAs, each arriving on its own CTA's and
// its peer's: 256 remote arrivals a stage, each behind a GPU-wide fence (the
// cluster-scope release), or with p.v3_ws_warp_arrivals 8, without the fence (as
// CUTLASS). The cluster kernels ran at 55% of the single-CTA ones on an H100
// (session 9); the remote arrivals and their fences are the suspects the opt-in
// warp arrivals test. A CTA whose m tile lies past M runs every step (it loads no A and
// stores nothing). Neither CTA exits before the other is done with it.
constexpr int kWsThreads = 384, kWsConsumerThreads = 256, kWsConsumerWarps = kWsConsumerThreads / 32;
// Per-thread registers after setmaxnreg: the CTA's 384 x 168 (launch bounds) are
// exactly 128 x 40 + 256 x 232; a build giving the kernel fewer would leave the
// consumers' setmaxnreg.inc waiting forever, so launch_ws checks it.
constexpr int kWsProducerRegs = 40, kWsConsumerRegs = 232;
constexpr int kWsRegsPerCta =
    (kWsThreads - kWsConsumerThreads) * kWsProducerRegs + kWsConsumerThreads * kWsConsumerRegs;
static_assert(kWsRegsPerCta <= 65536, "the warp-specialized register split exceeds an SM's registers");
constexpr int kStagesF8Ws = 6;  // 6 x 32 KiB
constexpr int kF8WsSmemBytes = kStagesF8Ws * kF8StageBytes + 1024;
static_assert(kF8WsSmemBytes <= 227 * 1024, "FP8 warp-specialized shared memory exceeds sm_90's limit");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

template <int kStages>
struct WsBarriers {
  uint64_t full[kStages];   // 1 arrival (the producer's expect_tx) + the stage's bytes
  uint64_t empty[kStages];  // an arrival per consumer thread (warp) of each CTA feeding the stage
};

template <bool kCluster, int kStages>
__device__ __forceinline__ void ws_init(WsBarriers<kStages>& bars, bool warp_arrivals) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(shared_addr(&bars.full[s]), 1);
      mbar_init(shared_addr(&bars.empty[s]),
                (warp_arrivals ? kWsConsumerWarps : kWsConsumerThreads) * (kCluster ? 2 : 1));
    }
    fence_mbar_init();
  }
  if constexpr (kCluster) {
    cluster_sync();  // both CTAs' barriers exist before either multicasts or arrives remotely
  } else {
    __syncthreads();
  }
}

// The persistent schedule: f(tile, n0) for each of this CTA's tiles. Plain: tiles
// blockIdx.x, + gridDim.x, ... of the raster order, skipping grouped tiles past
// the last group's rows. kCluster: the cluster's pairs of m tiles blockIdx.x / 2,
// + gridDim.x / 2, ..., rank r taking m tile 2i + r, none skipped (a tile past M
// has row_end <= row_begin). Called by whole warps (locate_row_tile).
template <bool kCluster, int BM, int BN, typename P, typename F>
__device__ __forceinline__ void for_each_ws_tile(const P& p, F&& f) {
  const int64_t m_tiles = row_tiles(p, BM), n_tiles = (p.n + BN - 1) / BN;
  if constexpr (kCluster) {
    const int64_t rank = cluster_ctarank(), pairs = (m_tiles + 1) / 2;
    for (int64_t t = blockIdx.x / 2; t < pairs * n_tiles; t += gridDim.x / 2) {
      int64_t pair, n_tile;
      raster_order(t, pairs, n_tiles, pair, n_tile);
      RowTile tile;
      tile.row_begin = (2 * pair + rank) * BM;
      tile.row_end = min(tile.row_begin + BM, p.m);
      f(tile, n_tile * BN);
    }
  } else {
    for (int64_t t = blockIdx.x; t < m_tiles * n_tiles; t += gridDim.x) {
      int64_t m_tile, n_tile;
      raster_order(t, m_tiles, n_tiles, m_tile, n_tile);
      RowTile tile;
      if (locate_row_tile<BM>(p, m_tile, tile)) f(tile, n_tile * BN);
    }
  }
}

// The producer (warp 0): every tile's k_tiles stages in pipeline order `it`
// (stage it % kStages, its phase it / kStages); lane 0 waits for the stage's
// release (the first pass finds the fresh barriers' parity-1 phase complete)
// and copies K tile kt (kKElems elements from kt * kKElems) of A and B into it.
template <bool kCluster, int BM, int BN, int kStages, int kKElems, typename P>
__device__ __forceinline__ void ws_produce(const P& p, WsBarriers<kStages>& bars, uint32_t smem_base,
                                           const CUtensorMap& tma_a, const CUtensorMap& tma_b,
                                           int64_t k_tiles) {
  constexpr uint32_t kStageBytes = (BM + BN) * 128;
  const uint32_t rank = kCluster ? cluster_ctarank() : 0;
  int64_t it = 0;
  for_each_ws_tile<kCluster, BM, BN>(p, [&](const RowTile& tile, int64_t n0) {
    if ((threadIdx.x & 31) == 0) {
      for (int64_t kt = 0; kt < k_tiles; ++kt, ++it) {
        const int s = static_cast<int>(it % kStages);
        mbar_wait(shared_addr(&bars.empty[s]), static_cast<uint32_t>(((it / kStages) & 1) ^ 1));
        const uint32_t sa = smem_base + s * kStageBytes;
        tma_load_stage<kCluster, BM, BN>(sa, sa + BM * 128, shared_addr(&bars.full[s]), tma_a, tma_b,
                                         static_cast<int32_t>(kt * kKElems), tile.row_begin,
                                         !kCluster || tile.row_begin < p.m, tile.group * p.n + n0, rank);
      }
    }
    __syncwarp();
  });
}

// Consumer side of pipeline step `it`: its stage once it holds the copies; its
// release (called by every consumer thread once its wgmma reading the stage are
// done; with warp_arrivals lane 0 arrives for the converged warp), in the peer
// CTA too with kCluster (the peer's producer writes half of this CTA's stage).
template <int kStages>
__device__ __forceinline__ int ws_acquire(WsBarriers<kStages>& bars, int64_t it) {
  const int s = static_cast<int>(it % kStages);
  mbar_wait(shared_addr(&bars.full[s]), static_cast<uint32_t>((it / kStages) & 1));
  return s;
}
template <bool kCluster, int kStages>
__device__ __forceinline__ void ws_release(WsBarriers<kStages>& bars, int64_t it, bool warp_arrivals) {
  if (warp_arrivals) __syncwarp();  // every lane passed its wgmma wait
  if (!warp_arrivals || (threadIdx.x & 31) == 0) {
    const uint32_t bar = shared_addr(&bars.empty[it % kStages]);
    mbar_arrive(bar);
    if constexpr (kCluster) {
      const uint32_t peer = cluster_map_shared(bar, cluster_ctarank() ^ 1);
      if (warp_arrivals) {
        mbar_arrive_remote(peer);  // the stage's reads are complete: no fence needed
      } else {
        mbar_arrive_cluster(peer);
      }
    }
  }
}

// The kernels' frame: the stages (dynamic shared memory from a 1 KiB boundary,
// smem_base) and their barriers, roles and registers; produce(bars, smem_base)
// runs on warp 0, consume(bars, smem_base, consumer warpgroup 0 / 1) on
// warpgroups 1 and 2. With kCluster every thread meets the cluster barrier last:
// neither CTA exits while its peer may still multicast into it or arrive on its
// barriers. warp_arrivals: the consumers release stages per warp (ws_release).
template <bool kCluster, int kStages, typename Produce, typename Consume>
__device__ __forceinline__ void ws_run(Produce&& produce, Consume&& consume, bool warp_arrivals) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ __align__(8) WsBarriers<kStages> bars;
  const uint32_t smem_base = (shared_addr(smem_raw) + 1023u) & ~1023u;
  ws_init<kCluster>(bars, warp_arrivals);
  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    setmaxnreg_dec<kWsProducerRegs>();
    if (threadIdx.x < 32) produce(bars, smem_base);
  } else {
    setmaxnreg_inc<kWsConsumerRegs>();
    consume(bars, smem_base, warpgroup - 1);
  }
  if constexpr (kCluster) cluster_sync();
}
#endif

// bf16/fp16: v3's tiles, stages and wgmma; a consumer keeps one K tile's wgmma
// in flight while it issues the next (wait_group 1), then releases the older
// tile's stage.
template <typename T, bool kCluster>
__global__ void __launch_bounds__(kWsThreads, 1)
    ws_gemm_kernel(GemmParams p, const __grid_constant__ CUtensorMap tma_a,
                   const __grid_constant__ CUtensorMap tma_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Barriers = WsBarriers<kStagesV3>;
  const int64_t k_tiles = (p.k + kV3BK - 1) / kV3BK;
  auto produce = [&](Barriers& bars, uint32_t smem_base) {
    ws_produce<kCluster, kV3BM, kV3BN, kStagesV3, kV3BK>(p, bars, smem_base, tma_a, tma_b, k_tiles);
  };
  auto consume = [&](Barriers& bars, uint32_t smem_base, int cw) {  // rows cw * 64 of each tile
    const int warp_in_group = (threadIdx.x % 128) / 32;
    int64_t it = 0;
    float acc[1][kV3BN / 8][4];
    for_each_ws_tile<kCluster, kV3BM, kV3BN>(p, [&](const RowTile& tile, int64_t n0) {
      // As v3: a consumer with no rows in a short grouped tile skips its wgmma.
      const bool wg_rows = !p.v3_skip_empty_rows || tile.row_begin + cw * 64 < tile.row_end;
      zero_accumulators(acc);
      for (int64_t kt = 0; kt < k_tiles; ++kt, ++it) {
        const uint32_t stage = smem_base + static_cast<uint32_t>(ws_acquire(bars, it)) * kV3StageBytes;
        const uint32_t sa = stage + cw * 64 * kV3RowBytes, sb = stage + kV3BM * kV3RowBytes;
        if (wg_rows) issue_v3_tile<T>(acc, sa, sb);
        wgmma_wait<1>();
        pin_accumulators(acc);
        if (kt > 0) ws_release<kCluster>(bars, it - 1, p.v3_ws_warp_arrivals);
      }
      wgmma_wait<0>();
      pin_accumulators(acc);
      if (k_tiles > 0) ws_release<kCluster>(bars, it - 1, p.v3_ws_warp_arrivals);
      mma_epilogue(p, acc, tile.row_begin + cw * 64 + warp_in_group * 16, tile.row_end, n0);
    });
  };
  ws_run<kCluster, kStagesV3>(produce, consume, p.v3_ws_warp_arrivals);
#else
  __trap();  // never launched: launch_ws checks the kernel was built for sm_90a
#endif
}

// FP8: FP8 v3's tiles, wgmma and promotion (kFma: the fused one), kStagesF8Ws
// stages. A consumer waits for each block's wgmma, releases its stage and
// promotes; its scales are read before it waits for the block's copies, so their
// latency hides there.
template <bool kCluster, bool kFma>
__global__ void __launch_bounds__(kWsThreads, 1)
    fp8_ws_gemm_kernel(Fp8GemmParams p, const __grid_constant__ CUtensorMap tma_a,
                       const __grid_constant__ CUtensorMap tma_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Barriers = WsBarriers<kStagesF8Ws>;
  auto produce = [&](Barriers& bars, uint32_t smem_base) {
    ws_produce<kCluster, kF8BM, kF8BN, kStagesF8Ws, kFp8Block>(p, bars, smem_base, tma_a, tma_b, p.k_blocks);
  };
  auto consume = [&](Barriers& bars, uint32_t smem_base, int cw) {  // rows cw * 64 of each tile
    const int lane = threadIdx.x & 31, warp_in_group = (threadIdx.x % 128) / 32;
    GemmParams out;  // the shared epilogue's view: plain stores
    out.out = p.out;
    out.out_dtype = p.out_dtype;
    out.m = p.m;
    out.n = p.n;
    int64_t it = 0;
    // part needs no zeroing: a block's first wgmma overwrites it (scale-d 0).
    float part[1][kF8BN / 8][4], acc[1][kF8BN / 8][4];
    for_each_ws_tile<kCluster, kF8BM, kF8BN>(p, [&](const RowTile& tile, int64_t n0) {
      const float* __restrict__ w_scales =
          p.w_scales + (tile.group * ((p.n + kFp8Block - 1) / kFp8Block) + n0 / kFp8Block) * p.k_blocks;
      const int64_t warp_row0 = tile.row_begin + cw * 64 + warp_in_group * 16;
      const float* __restrict__ a_scales[2];  // the thread's two rows (clamped into the tile's)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        a_scales[half] = p.a_scales + min(warp_row0 + (lane >> 2) + half * 8, tile.row_end - 1) * p.k_blocks;
      zero_accumulators(acc);
      for (int64_t kb = 0; kb < p.k_blocks; ++kb, ++it) {
        const float scale0 = a_scales[0][kb], scale1 = a_scales[1][kb], w_scale = w_scales[kb];
        const uint32_t stage = smem_base + static_cast<uint32_t>(ws_acquire(bars, it)) * kF8StageBytes;
        const uint32_t sa = stage + cw * 64 * kF8RowBytes, sb = stage + kF8BM * kF8RowBytes;
        issue_fp8_block(part, sa, sb);
        wgmma_wait<0>();
        pin_accumulators(part);
        ws_release<kCluster>(bars, it, p.v3_ws_warp_arrivals);
        promote_fp8_block<kFma>(acc, part, {scale0, scale1}, w_scale);
      }
      mma_epilogue(out, acc, warp_row0, tile.row_end, n0);
    });
  };
  ws_run<kCluster, kStagesF8Ws>(produce, consume, p.v3_ws_warp_arrivals);
#else
  __trap();  // never launched: launch_ws checks the kernel was built for sm_90a
#endif
}

// ---------------------------------------------------------------------------
// SIMT fp32 kernel
// ---------------------------------------------------------------------------

constexpr int kSimtTile = 64, kSimtBK = 16, kSimtThreads = 256;

__global__ void __launch_bounds__(kSimtThreads) simt_gemm_kernel(GemmParams p) {
  // K-major shared tiles ([k][row]); +4 keeps the transposing stores spread over banks.
  __shared__ float sa[kSimtBK][kSimtTile + 4];
  __shared__ float sb[kSimtBK][kSimtTile + 4];
  RowTile tile;
  if (!locate_row_tile<kSimtTile>(p, blockIdx.x, tile)) return;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSimtTile;
  const float* __restrict__ a = static_cast<const float*>(p.a);
  const float* __restrict__ b = static_cast<const float*>(p.b) + tile.group * p.n * p.k;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += kSimtBK) {
#pragma unroll
    for (int r = 0; r < kSimtTile * kSimtBK / kSimtThreads; ++r) {
      const int idx = tid + r * kSimtThreads;
      const int row = idx / kSimtBK, kk = idx % kSimtBK;
      const int64_t gk = k0 + kk, grow = tile.row_begin + row, gn = n0 + row;
      sa[kk][row] = (grow < tile.row_end && gk < p.k) ? a[grow * p.k + gk] : 0.0f;
      sb[kk][row] = (gn < p.n && gk < p.k) ? b[gn * p.k + gk] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = sa[kk][ty + 16 * i];
        bv[i] = sb[kk][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = tile.row_begin + ty + 16 * i;
    if (row >= tile.row_end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= p.n) continue;
      float v = acc[i][j];
      if (p.bias != nullptr) v += p.bias[col];
      store_out(p.out, p.out_dtype, row * p.n + col, apply_activation(v, p.activation));
    }
  }
}

// ---------------------------------------------------------------------------
// INT8: dp4a kernel and row-wise quantization
// ---------------------------------------------------------------------------

constexpr int kI8Tile = 64, kI8Words = 16;  // 64 x 64 outputs, 64 bytes of K (16 words) per step

__device__ __forceinline__ int32_t load_int8x4(const int8_t* row, int64_t k, int64_t k_total,
                                               bool row_valid) {
  if (!row_valid || k >= k_total) return 0;
  if (k + 4 <= k_total && (reinterpret_cast<uintptr_t>(row + k) & 3) == 0)
    return *reinterpret_cast<const int32_t*>(row + k);
  uint32_t word = 0;
  for (int i = 0; i < 4 && k + i < k_total; ++i)
    word |= static_cast<uint32_t>(static_cast<uint8_t>(row[k + i])) << (8 * i);
  return static_cast<int32_t>(word);
}

__global__ void __launch_bounds__(256) int8_gemm_kernel(Int8GemmParams p) {
  __shared__ int32_t sa[kI8Words][kI8Tile + 1];
  __shared__ int32_t sb[kI8Words][kI8Tile + 1];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kI8Tile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kI8Tile;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  int32_t acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += 4 * kI8Words) {
#pragma unroll
    for (int r = 0; r < kI8Tile * kI8Words / 256; ++r) {
      const int idx = tid + r * 256;
      const int row = idx / kI8Words, w = idx % kI8Words;
      const int64_t gk = k0 + 4 * w;
      sa[w][row] = load_int8x4(p.a + (m0 + row) * p.k, gk, p.k, m0 + row < p.m);
      sb[w][row] = load_int8x4(p.w + (n0 + row) * p.k, gk, p.k, n0 + row < p.n);
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kI8Words; ++w) {
      int32_t av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = sa[w][ty + 16 * i];
        bv[i] = sb[w][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= p.m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= p.n) continue;
      float v = __fmul_rn(__fmul_rn(__int2float_rn(acc[i][j]), p.a_scales[row]), p.w_scales[col]);
      if (p.bias != nullptr) v = __fadd_rn(v, p.bias[col]);
      store_out(p.out, p.out_dtype, row * p.n + col, v);
    }
  }
}

// One warp per row: absmax (bit pattern of |x|, NaN/Inf >= 0x7f800000), then codes.
template <typename T>
__global__ void __launch_bounds__(256) quantize_rows_int8_kernel(QuantizeRowsParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < p.rows;
       r += warps) {
    const T* xr = x + r * p.cols;
    uint32_t amax = 0;
    for (int64_t i = lane; i < p.cols; i += 32)
      amax = max(amax, __float_as_uint(to_float(xr[i])) & 0x7fffffffu);
    amax = warp_max(amax);
    const bool finite = amax < 0x7f800000u;
    float scale = __fdiv_rn(__uint_as_float(amax), 127.0f);
    if (scale == 0.0f) scale = 1.0f;
    if (!finite) scale = __int_as_float(0x7fc00000);  // quiet NaN
    if (lane == 0) p.scales[r] = scale;
    int8_t* qr = p.q + r * p.cols;
    for (int64_t i = lane; i < p.cols; i += 32) {
      const float c = finite ? fminf(fmaxf(rintf(__fdiv_rn(to_float(xr[i]), scale)), -127.0f), 127.0f) : 0.0f;
      qr[i] = static_cast<int8_t>(static_cast<int>(c));
    }
  }
}

// ---------------------------------------------------------------------------
// FP8 e4m3 block-scaled: quantization and the exact SIMT GEMM
// ---------------------------------------------------------------------------

__device__ __forceinline__ float fp8_to_float(uint8_t bits) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(bits), __NV_E4M3)));
}

// One warp per quantization block (1 x 128 or 128 x 128 elements).
template <typename T>
__global__ void __launch_bounds__(256) quantize_fp8_kernel(QuantizeFp8Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t row_blocks = (p.rows + p.block_rows - 1) / p.block_rows;
  const int64_t per_item = row_blocks * p.col_blocks;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
       b < p.batch * per_item; b += warps) {
    // Block b: matrix b / per_item, then row-block-major; rows index the whole batch.
    const int64_t first = b / per_item * p.rows, rb = b % per_item / p.col_blocks;
    const int64_t r0 = first + rb * p.block_rows, c0 = b % p.col_blocks * kFp8Block;
    const int64_t r1 = first + min((rb + 1) * p.block_rows, p.rows), c1 = min(c0 + kFp8Block, p.cols);
    uint32_t amax = 0;  // bit pattern of |x|: NaN/Inf >= 0x7f800000
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = c0 + lane; c < c1; c += 32)
        amax = max(amax, __float_as_uint(to_float(x[r * p.cols + c])) & 0x7fffffffu);
    amax = warp_max(amax);
    const bool finite = amax < 0x7f800000u;
    float scale = __fdiv_rn(__uint_as_float(amax), 448.0f);
    if (scale == 0.0f) scale = 1.0f;
    if (!finite) scale = __int_as_float(0x7fc00000);
    if (lane == 0) p.scales[b] = scale;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = c0 + lane; c < c1; c += 32) {
        const float v = finite ? __fdiv_rn(to_float(x[r * p.cols + c]), scale) : 0.0f;
        p.q[r * p.cols + c] = static_cast<uint8_t>(
            __nv_cvt_float_to_fp8(fminf(fmaxf(v, -448.0f), 448.0f), __NV_SATFINITE, __NV_E4M3));
      }
    }
  }
}

constexpr int kFp8Tile = 64, kFp8Step = 32;  // 64 x 64 outputs; K staged 32 at a time

__global__ void __launch_bounds__(256) fp8_gemm_kernel(Fp8GemmParams p) {
  __shared__ float sa[kFp8Step][kFp8Tile + 4];
  __shared__ float sb[kFp8Step][kFp8Tile + 4];
  RowTile tile;
  if (!locate_row_tile<kFp8Tile>(p, blockIdx.x, tile)) return;  // CTA-uniform
  const int64_t m0 = tile.row_begin, m_end = tile.row_end;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kFp8Tile;
  const uint8_t* __restrict__ w = p.w + tile.group * p.n * p.k;
  const float* __restrict__ w_scales = p.w_scales + tile.group * ((p.n + kFp8Block - 1) / kFp8Block) * p.k_blocks;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[4][4] = {};
  for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
    float part[4][4] = {};
    const int64_t k_end = min((kb + 1) * kFp8Block, p.k);
    for (int64_t k0 = kb * kFp8Block; k0 < k_end; k0 += kFp8Step) {
#pragma unroll
      for (int r = 0; r < kFp8Tile * kFp8Step / 256; ++r) {
        const int idx = tid + r * 256;
        const int row = idx / kFp8Step, kk = idx % kFp8Step;
        const int64_t gk = k0 + kk;
        sa[kk][row] = (m0 + row < m_end && gk < k_end) ? fp8_to_float(p.a[(m0 + row) * p.k + gk]) : 0.0f;
        sb[kk][row] = (n0 + row < p.n && gk < k_end) ? fp8_to_float(w[(n0 + row) * p.k + gk]) : 0.0f;
      }
      __syncthreads();
      // Only real K positions are summed (a zero-filled one could turn a -0 sum into +0).
      const int steps = k_end - k0 < kFp8Step ? static_cast<int>(k_end - k0) : kFp8Step;
      for (int kk = 0; kk < steps; ++kk) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          av[i] = sa[kk][ty + 16 * i];
          bv[i] = sb[kk][tx + 16 * i];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) part[i][j] = __fadd_rn(part[i][j], __fmul_rn(av[i], bv[j]));
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = min(m0 + ty + 16 * i, m_end - 1);  // clamped reads; stores are masked
      const float a_scale = p.a_scales[row * p.k_blocks + kb];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = min(n0 + tx + 16 * j, p.n - 1);
        const float w_scale = w_scales[(col / kFp8Block) * p.k_blocks + kb];
        acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(__fmul_rn(part[i][j], a_scale), w_scale));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= m_end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col < p.n) store_out(p.out, p.out_dtype, row * p.n + col, acc[i][j]);
    }
  }
}

// FP8 on tensor cores (v2, sm_89+; v3's fallback, see
// gemm_params.h): the v1 tiling on pairs of e4m3 codes, so a 64-byte shared row
// holds 64 codes of K and a 128-wide scale block is two k tiles. Each 128-wide
// block's sum builds up in `part` on the tensor cores, then is folded into the
// fp32 accumulator as acc += (part * a_scale) * w_scale (DeepSeek-V3's promotion
// of partial sums). Same per-block scaling as the SIMT kernel, but the tensor
// cores sum each block in their own order: results agree with the SIMT/CPU
// contract to within the rounding of those sums, not bitwise.
template <int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32) fp8_mma_gemm_kernel(Fp8GemmParams p) {
  using Pair = E4m3x2;
  constexpr int kWarpM = BM / WARPS_M, kWarpN = BN / WARPS_N;
  constexpr int MI = kWarpM / 16, NI = kWarpN / 8;
  constexpr int kTilesPerBlock = kFp8Block / (2 * kBK);  // 2 k tiles of 64 codes
  static_assert(kFp8Block % BN == 0, "a CTA's columns share one 128-row block of w scales");
  __shared__ __align__(128) Pair smem_a[kStages][BM * kBK];
  __shared__ __align__(128) Pair smem_b[kStages][BN * kBK];

  int64_t m_tile, n_tile;
  raster_order(blockIdx.x, row_tiles(p, BM), (p.n + BN - 1) / BN, m_tile, n_tile);
  RowTile tile;
  if (!locate_row_tile<BM>(p, m_tile, tile)) return;  // CTA-uniform
  const int64_t n0 = n_tile * BN;
  const int64_t k_pairs = p.k / 2;  // the launcher takes K % 16 == 0 only
  const int64_t k_tiles = (k_pairs + kBK - 1) / kBK;
  const Pair* __restrict__ a = reinterpret_cast<const Pair*>(p.a);
  const Pair* __restrict__ b = reinterpret_cast<const Pair*>(p.w + tile.group * p.n * p.k);
  const float* __restrict__ w_scales =
      p.w_scales + (tile.group * ((p.n + kFp8Block - 1) / kFp8Block) + n0 / kFp8Block) * p.k_blocks;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t warp_row0 = tile.row_begin + (warp / WARPS_N) * kWarpM;
  float part[MI][NI][4], acc[MI][NI][4];
  zero_accumulators(acc);
  mma_mainloop<Pair, BM, BN, WARPS_M, WARPS_N>(
      a, b, k_pairs, tile, n0, p.n, smem_a, smem_b, part, [&](int64_t kt) {
        if ((kt + 1) % kTilesPerBlock != 0 && kt + 1 != k_tiles) return;
        const int64_t kb = kt / kTilesPerBlock;
        const float w_scale = w_scales[kb];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            // Accumulators 2*half, 2*half+1 of tile (mi, *) are row lane/4 + 8*half.
            const int64_t row = min(warp_row0 + mi * 16 + (lane >> 2) + half * 8, tile.row_end - 1);
            const float a_scale = p.a_scales[row * p.k_blocks + kb];
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
              for (int j = 2 * half; j < 2 * half + 2; ++j) {
                acc[mi][ni][j] = __fadd_rn(acc[mi][ni][j],
                                           __fmul_rn(__fmul_rn(part[mi][ni][j], a_scale), w_scale));
                part[mi][ni][j] = 0.0f;
              }
            }
          }
        }
      });
  GemmParams out;  // the shared epilogue's view: plain stores, no bias or activation
  out.out = p.out;
  out.out_dtype = p.out_dtype;
  out.m = p.m;
  out.n = p.n;
  mma_epilogue(out, acc, warp_row0, tile.row_end, n0 + (warp % WARPS_N) * kWarpN);
}

// INT8 on tensor cores (v2, the default where K % 16 == 0): mma.sync m16n8k32
// s8 on the v1 tiling (pairs of codes, as FP8). Integer sums are exact in any
// order, and the epilogue rounds as the dp4a kernel's, so the two agree bitwise.
// Two CTAs per SM: ptxas then fits the 128 x 128 tile in 128 registers instead of
// ~178 (one CTA per SM) without spills on sm_90a (4 bytes on sm_80).
template <int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32, 2) int8_mma_gemm_kernel(Int8GemmParams p) {
  constexpr int kWarpM = BM / WARPS_M, kWarpN = BN / WARPS_N;
  constexpr int MI = kWarpM / 16, NI = kWarpN / 8;
  __shared__ __align__(128) S8x2 smem_a[kStages][BM * kBK];
  __shared__ __align__(128) S8x2 smem_b[kStages][BN * kBK];

  int64_t m_tile, n_tile;
  raster_order(blockIdx.x, (p.m + BM - 1) / BM, (p.n + BN - 1) / BN, m_tile, n_tile);
  RowTile tile;
  tile.row_begin = m_tile * BM;
  tile.row_end = min(tile.row_begin + BM, p.m);
  const int64_t n0 = n_tile * BN;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t warp_row0 = tile.row_begin + (warp / WARPS_N) * kWarpM;
  const int64_t warp_n0 = n0 + (warp % WARPS_N) * kWarpN;
  float acc[MI][NI][4];  // int32 bit patterns until the scaling below
  mma_mainloop<S8x2, BM, BN, WARPS_M, WARPS_N>(reinterpret_cast<const S8x2*>(p.a),
                                               reinterpret_cast<const S8x2*>(p.w), p.k / 2, tile, n0,
                                               p.n, smem_a, smem_b, acc, [](int64_t) {});
  // (float(acc) * a_scale[row]) * w_scale[col] in place (reads clamped, stores masked),
  // then the shared epilogue adds the bias and stores.
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = min(warp_row0 + mi * 16 + (lane >> 2) + half * 8, p.m - 1);
      const float a_scale = p.a_scales[row];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t col = min(warp_n0 + ni * 8 + (lane & 3) * 2 + j, p.n - 1);
          float& v = acc[mi][ni][2 * half + j];
          v = __fmul_rn(__fmul_rn(__int2float_rn(__float_as_int(v)), a_scale), p.w_scales[col]);
        }
      }
    }
  }
  GemmParams out;  // the shared epilogue's view: bias, no activation
  out.out = p.out;
  out.out_dtype = p.out_dtype;
  out.bias = p.bias;
  out.m = p.m;
  out.n = p.n;
  mma_epilogue(out, acc, warp_row0, tile.row_end, warp_n0);
}

// ---------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
void launch_mma(const GemmParams& p, cudaStream_t stream) {
  // 1-D grid in raster order (see raster_order).
  const int64_t ctas = row_tiles(p, BM) * ((p.n + BN - 1) / BN);
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  mma_gemm_kernel<T, BM, BN, WARPS_M, WARPS_N><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(p);
}

template <typename T>
void launch_mma_for_shape(const GemmParams& p, cudaStream_t stream) {
  // 128 x 128 tiles (8 warps of 64 x 32) when they fill the GPU; 64 x 64 tiles
  // (4 warps of 32 x 32) for small problems, which would leave SMs idle.
  const int64_t big_tiles = row_tiles(p, 128) * ((p.n + 127) / 128);
  if (big_tiles >= multiprocessor_count()) {
    launch_mma<T, 128, 128, 2, 4>(p, stream);
  } else {
    launch_mma<T, 64, 64, 2, 2>(p, stream);
  }
}

// v2 needs more than the 48 KiB default of dynamic shared memory: opt in once
// per device (the attribute is per device and function; idempotent, so a race
// between threads only repeats it). Devices that cannot give kV2SmemBytes to one
// block (sm_86/sm_89: 99 KiB) run v1: returns false without launching.
template <typename T>
bool launch_mma_v2(const GemmParams& p, cudaStream_t stream, cudaError_t& err) {
  static std::atomic<uint64_t> checked{0}, usable{0};  // bit d: device d (< 64)
  int device = 0;
  err = cudaGetDevice(&device);
  if (err != cudaSuccess) return true;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || (checked.load(std::memory_order_acquire) & bit) == 0) {
    int optin = 0;
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return true;
    if (optin < kV2SmemBytes) {
      checked.fetch_or(bit, std::memory_order_release);
      return false;
    }
    err = cudaFuncSetAttribute(mma_gemm_v2_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               kV2SmemBytes);
    if (err != cudaSuccess) return true;
    usable.fetch_or(bit, std::memory_order_relaxed);
    checked.fetch_or(bit, std::memory_order_release);
  } else if ((usable.load(std::memory_order_relaxed) & bit) == 0) {
    return false;
  }
  const int64_t ctas = row_tiles(p, kV2BM) * ((p.n + kV2BN - 1) / kV2BN);
  mma_gemm_v2_kernel<T><<<static_cast<unsigned>(ctas), kV2Threads, kV2SmemBytes, stream>>>(p);
  err = cudaGetLastError();
  return true;
}

// v3 needs the sm_90a build of its kernel on a compute capability 9.0 GPU and
// 193 KiB of dynamic shared memory (wgmma_usable, common/sm90.cuh); its launchers
// return false (nothing launched) elsewhere.

// cuTensorMapEncodeTiled from the driver, through the runtime (no link to
// libcuda); null where the driver does not have it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                             cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // not sticky: clear it
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// Tensor map of `rows` K-contiguous rows of k values of `elem` bytes (bf16/fp16,
// or FP8 codes as uint8), read in boxes of 128 bytes x box_rows with the 128-byte
// swizzle; false where TMA cannot describe it.
bool encode_operand_map(CUtensorMap& map, const void* base, CUtensorMapDataType type, int64_t elem,
                        int64_t k, int64_t rows, uint32_t box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  constexpr int64_t kMaxCoord = (int64_t{1} << 31) - 1;  // the kernel's int32 coordinates
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0 || (k * elem) % 16 != 0 ||
      k <= 0 || rows <= 0 || k > kMaxCoord || rows > kMaxCoord)
    return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(k * elem)};  // bytes, dims 1..
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(128 / elem), box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(&map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// `kernel` on one CTA per (m tile, n tile); with kCluster in clusters of two
// along M (the m tiles rounded up to pairs) through a launch attribute, since
// __cluster_dims__ does not compile for sm_80.
template <bool kCluster, typename... Params, typename... Args>
cudaError_t launch_tile_grid(void (*kernel)(Params...), int64_t m_tiles, int64_t n_tiles, int threads,
                             int smem, cudaStream_t stream, const Args&... args) {
  const int64_t ctas = (kCluster ? 2 * ((m_tiles + 1) / 2) : m_tiles) * n_tiles;
  if constexpr (!kCluster) {
    kernel<<<static_cast<unsigned>(ctas), threads, smem, stream>>>(args...);
    return cudaGetLastError();
  } else {
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 2;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    return launch_with_attribute(cluster, kernel, dim3(static_cast<unsigned>(ctas)), dim3(threads), smem,
                                 stream, args...);
  }
}

template <typename T, bool kTma, bool kCluster = false, bool kDeep = false>
bool launch_wgmma_variant(const GemmParams& p, const CUtensorMap& map_a, const CUtensorMap& map_b,
                          cudaStream_t stream, cudaError_t& err) {
  static std::atomic<uint64_t> checked{0}, usable{0};
  constexpr auto kernel = wgmma_gemm_kernel<T, kTma, kCluster, kDeep>;
  if (!wgmma_usable(kernel, kV3SmemBytes, p.built_sm90a, checked, usable, err)) return false;
  if (err != cudaSuccess) return true;
  err = launch_tile_grid<kCluster>(kernel, row_tiles(p, kV3BM), (p.n + kV3BN - 1) / kV3BN, kV3Threads,
                                   kV3SmemBytes, stream, p, map_a, map_b);
  note_kernel_ran(LaunchedFamily::kGemmV3Variant,
                  (kTma ? kV3Tma : 0) | (kCluster ? kV3Cluster : 0) | (kDeep ? kV3Deep : 0));
  return true;
}

// The warp-specialized kernels (ws_gemm_kernel, fp8_ws_gemm_kernel), BM x BN
// tiles: one persistent CTA per SM (fewer for fewer tiles); kCluster: as many
// clusters of two as the GPU holds at once (fewer for fewer pairs of m tiles).
// False (nothing launched) where the kernel cannot run.
template <bool kCluster, auto kernel, typename P>
bool launch_ws(const P& p, int64_t bm, int64_t bn, int smem, const CUtensorMap& map_a,
               const CUtensorMap& map_b, int variant_bits, cudaStream_t stream, cudaError_t& err) {
  static std::atomic<uint64_t> checked{0}, usable{0};  // per kernel (wgmma_usable)
  if (!wgmma_usable(kernel, smem, p.built_sm90a, checked, usable, err)) return false;
  if (err != cudaSuccess) return true;
  static const bool regs_ok = [] {  // the register split's premise (kWsRegsPerCta)
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.numRegs * kWsThreads >= kWsRegsPerCta;
  }();
  if (!regs_ok) return false;
  const int64_t m_tiles = row_tiles(p, bm), n_tiles = (p.n + bn - 1) / bn;
  if constexpr (!kCluster) {
    const int64_t ctas = std::min<int64_t>(m_tiles * n_tiles, multiprocessor_count());
    kernel<<<static_cast<unsigned>(ctas), kWsThreads, smem, stream>>>(p, map_a, map_b);
    err = cudaGetLastError();
  } else {
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 2;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    // Clusters resident at once (GPCs may leave an SM unpaired), per device; a
    // smaller grid would leave SMs idle, a larger one run a second partial wave.
    static std::atomic<int> resident_on[64] = {};
    int device = 0;
    if ((err = cudaGetDevice(&device)) != cudaSuccess) return true;
    int resident = device < 64 ? resident_on[device].load(std::memory_order_relaxed) : 0;
    if (resident == 0) {
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(2);
      config.blockDim = dim3(kWsThreads);
      config.dynamicSmemBytes = smem;
      config.attrs = &cluster;
      config.numAttrs = 1;
      if (cudaOccupancyMaxActiveClusters(&resident, kernel, &config) != cudaSuccess || resident < 1) {
        cudaGetLastError();  // not sticky: clear it
        resident = std::max(1, multiprocessor_count() / 2);
      }
      if (device < 64) resident_on[device].store(resident, std::memory_order_relaxed);
    }
    const int64_t clusters = std::min<int64_t>((m_tiles + 1) / 2 * n_tiles, resident);
    err = launch_with_attribute(cluster, kernel, dim3(static_cast<unsigned>(2 * clusters)), dim3(kWsThreads),
                                smem, stream, p, map_a, map_b);
  }
  constexpr LaunchedFamily family =
      std::is_same_v<P, GemmParams> ? LaunchedFamily::kGemmV3Variant : LaunchedFamily::kFp8V3Variant;
  note_kernel_ran(family, variant_bits | kV3Tma | kV3WarpSpecialized | (kCluster ? kV3Cluster : 0) |
                              (p.v3_ws_warp_arrivals ? kV3WsWarpArrivals : 0));
  return true;
}

// Warp-specialized v3 where the tensor maps can be made (B's boxes: half tiles
// for clusters) and the kernel can run: clusters for plain GEMMs with `cluster`,
// else (or where the cluster kernel cannot run) single CTAs.
// variant_bits: V3Variant bits the kernels add (kV3FmaPromotion).
template <auto kernel, auto cluster_kernel, typename P>
bool launch_ws_variant(const P& p, bool cluster, const void* a, const void* b, CUtensorMapDataType type,
                       int64_t elem, int64_t bm, int64_t bn, int smem, int variant_bits, cudaStream_t stream,
                       cudaError_t& err) {
  CUtensorMap map_a{}, map_b{};
  if (!encode_operand_map(map_a, a, type, elem, p.k, p.m, static_cast<uint32_t>(bm))) return false;
  if (cluster && p.offsets == nullptr &&
      encode_operand_map(map_b, b, type, elem, p.k, p.groups * p.n, static_cast<uint32_t>(bn / 2)) &&
      (launch_ws<true, cluster_kernel>(p, bm, bn, smem, map_a, map_b, variant_bits, stream, err) ||
       err != cudaSuccess))
    return true;
  return encode_operand_map(map_b, b, type, elem, p.k, p.groups * p.n, static_cast<uint32_t>(bn)) &&
         launch_ws<false, kernel>(p, bm, bn, smem, map_a, map_b, variant_bits, stream, err);
}

// v3 with TMA where both tensor maps can be made (p.v3_tma), else with cp.async;
// warp-specialized with p.v3_warp_specialized (TMA; it takes precedence; plain
// GEMMs in clusters of two with p.v3_cluster), else plain GEMMs in clusters of two
// with p.v3_cluster, the copies one tile further ahead with p.v3_deep_prefetch
// (both TMA only).
template <typename T>
bool launch_wgmma(const GemmParams& p, cudaStream_t stream, cudaError_t& err) {
  CUtensorMap map_a{}, map_b{};
  const CUtensorMapDataType type =
      p.ab_dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const bool cluster = p.v3_cluster && p.offsets == nullptr;
  if (p.v3_tma && p.v3_warp_specialized &&
      (launch_ws_variant<ws_gemm_kernel<T, false>, ws_gemm_kernel<T, true>>(p, p.v3_cluster, p.a, p.b, type, 2,
                                                                           kV3BM, kV3BN, kV3SmemBytes, 0, stream,
                                                                           err) ||
       err != cudaSuccess))
    return true;
  if (p.v3_tma && encode_operand_map(map_a, p.a, type, 2, p.k, p.m, kV3BM) &&
      encode_operand_map(map_b, p.b, type, 2, p.k, p.groups * p.n, cluster ? kV3BN / 2 : kV3BN)) {
    if (cluster) {
      const bool launched =
          p.v3_deep_prefetch ? launch_wgmma_variant<T, true, true, true>(p, map_a, map_b, stream, err)
                             : launch_wgmma_variant<T, true, true, false>(p, map_a, map_b, stream, err);
      if (launched || err != cudaSuccess) return true;
      if (!encode_operand_map(map_b, p.b, type, 2, p.k, p.groups * p.n, kV3BN))
        return launch_wgmma_variant<T, false>(p, map_a, map_b, stream, err);
    }
    return p.v3_deep_prefetch ? launch_wgmma_variant<T, true, false, true>(p, map_a, map_b, stream, err)
                              : launch_wgmma_variant<T, true>(p, map_a, map_b, stream, err);
  }
  return launch_wgmma_variant<T, false>(p, map_a, map_b, stream, err);
}

template <bool kTma, bool kDeep = false, bool kCluster = false>
bool launch_fp8_wgmma_variant(const Fp8GemmParams& p, const CUtensorMap& map_a, const CUtensorMap& map_b,
                              cudaStream_t stream, cudaError_t& err) {
  static std::atomic<uint64_t> checked{0}, usable{0};
  constexpr auto kernel = fp8_wgmma_gemm_kernel<kTma, kDeep, kCluster>;
  if (!wgmma_usable(kernel, kF8SmemBytes, p.built_sm90a, checked, usable, err)) return false;
  if (err != cudaSuccess) return true;
  err = launch_tile_grid<kCluster>(kernel, row_tiles(p, kF8BM), (p.n + kF8BN - 1) / kF8BN, kF8Threads,
                                   kF8SmemBytes, stream, p, map_a, map_b);
  note_kernel_ran(LaunchedFamily::kFp8V3Variant,
                  (kTma ? kV3Tma : 0) | (kCluster ? kV3Cluster : 0) | (kDeep ? kV3Deep : 0));
  return true;
}

// FP8 v3 with TMA where both tensor maps can be made (p.v3_tma), else with
// cp.async; warp-specialized with p.v3_warp_specialized (TMA; it takes
// precedence; clusters with p.v3_cluster, the fused promotion with
// p.v3_fma_promotion); else with TMA, the copies ahead by all stages with
// p.v3_deep_prefetch, and plain GEMMs in clusters of two with p.v3_cluster (which
// implies it).
bool launch_fp8_wgmma(const Fp8GemmParams& p, cudaStream_t stream, cudaError_t& err) {
  CUtensorMap map_a{}, map_b{};
  const bool cluster = p.v3_cluster && p.offsets == nullptr;
  if (p.v3_warp_specialized) {
    const bool launched =
        p.v3_fma_promotion
            ? launch_ws_variant<fp8_ws_gemm_kernel<false, true>, fp8_ws_gemm_kernel<true, true>>(
                  p, p.v3_cluster, p.a, p.w, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, kF8BM, kF8BN, kF8WsSmemBytes,
                  kV3FmaPromotion, stream, err)
            : launch_ws_variant<fp8_ws_gemm_kernel<false, false>, fp8_ws_gemm_kernel<true, false>>(
                  p, p.v3_cluster, p.a, p.w, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, kF8BM, kF8BN, kF8WsSmemBytes, 0,
                  stream, err);
    if (launched || err != cudaSuccess) return true;
  }
  if (p.v3_tma && encode_operand_map(map_a, p.a, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.k, p.m, kF8BM) &&
      encode_operand_map(map_b, p.w, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.k, p.groups * p.n,
                         cluster ? kF8BN / 2 : kF8BN)) {
    if (cluster) {
      if (launch_fp8_wgmma_variant<true, true, true>(p, map_a, map_b, stream, err) || err != cudaSuccess)
        return true;
      if (!encode_operand_map(map_b, p.w, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.k, p.groups * p.n, kF8BN))
        return launch_fp8_wgmma_variant<false>(p, map_a, map_b, stream, err);
    }
    return p.v3_deep_prefetch || p.v3_cluster
               ? launch_fp8_wgmma_variant<true, true>(p, map_a, map_b, stream, err)
               : launch_fp8_wgmma_variant<true>(p, map_a, map_b, stream, err);
  }
  return launch_fp8_wgmma_variant<false>(p, map_a, map_b, stream, err);
}

// FP8 tensor cores need a kernel built for sm_89+ (a compute_80 PTX build
// JIT-compiled for a newer GPU has none): the kernel's PTX version, read once per
// device, decides. Returns false (nothing launched) where they are missing.
bool launch_fp8_mma(const Fp8GemmParams& p, cudaStream_t stream, cudaError_t& err) {
  static std::atomic<uint64_t> checked{0}, usable{0};  // bit d: device d (< 64)
  int device = 0;
  err = cudaGetDevice(&device);
  if (err != cudaSuccess) return true;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || (checked.load(std::memory_order_acquire) & bit) == 0) {
    cudaFuncAttributes attr{};
    err = cudaFuncGetAttributes(&attr, fp8_mma_gemm_kernel<128, 128, 2, 4>);
    if (err != cudaSuccess) return true;
    if (attr.ptxVersion >= 89) usable.fetch_or(bit, std::memory_order_relaxed);
    checked.fetch_or(bit, std::memory_order_release);
    if (attr.ptxVersion < 89) return false;
  } else if ((usable.load(std::memory_order_relaxed) & bit) == 0) {
    return false;
  }
  const int64_t big_ctas = row_tiles(p, 128) * ((p.n + 127) / 128);
  if (big_ctas >= multiprocessor_count()) {
    fp8_mma_gemm_kernel<128, 128, 2, 4><<<static_cast<unsigned>(big_ctas), 256, 0, stream>>>(p);
  } else {
    const int64_t ctas = row_tiles(p, 64) * ((p.n + 63) / 64);
    fp8_mma_gemm_kernel<64, 64, 2, 2><<<static_cast<unsigned>(ctas), 128, 0, stream>>>(p);
  }
  err = cudaGetLastError();
  return true;
}

}  // namespace

int gemm_cuda(const GemmParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.m == 0 || p.n == 0) return static_cast<int>(cudaSuccess);
  // Forced v3 / v2 run where they can; auto picks v3 (else v2) for GEMMs, plain or
  // grouped, whose 128 x 256 tiles fill a wave, and v1's smaller tiles below. On
  // an H100: v3 at 86-91% of cuBLAS at 4096^3 and 8192^3 (v2 48-54%, v1 26-29%);
  // grouped at DeepSeek-V3 expert shapes v1 11.0 ms, v2 6.4, v3 4.4.
  const bool auto_big = p.cuda_kernel == kGemmKernelAuto &&
                        row_tiles(p, 128) * ((p.n + 255) / 256) >= multiprocessor_count();
  if (p.cuda_kernel == 3 || auto_big) {
    cudaError_t err = cudaSuccess;
    if ((p.ab_dtype == DType::kBFloat16 && launch_wgmma<__nv_bfloat16>(p, s, err)) ||
        (p.ab_dtype == DType::kFloat16 && launch_wgmma<__half>(p, s, err))) {
      note_kernel_ran(LaunchedFamily::kGemm, 3);
      return static_cast<int>(err);
    }
  }
  // v3 where it cannot run falls back to v2.
  if (p.cuda_kernel == 2 || p.cuda_kernel == 3 || auto_big) {
    cudaError_t err = cudaSuccess;
    if ((p.ab_dtype == DType::kBFloat16 && launch_mma_v2<__nv_bfloat16>(p, s, err)) ||
        (p.ab_dtype == DType::kFloat16 && launch_mma_v2<__half>(p, s, err))) {
      note_kernel_ran(LaunchedFamily::kGemm, 2);
      return static_cast<int>(err);
    }
  }
  note_kernel_ran(LaunchedFamily::kGemm, 1);
  switch (p.ab_dtype) {
    case DType::kBFloat16: launch_mma_for_shape<__nv_bfloat16>(p, s); break;
    case DType::kFloat16: launch_mma_for_shape<__half>(p, s); break;
    default: {
      const dim3 grid(static_cast<unsigned>(row_tiles(p, kSimtTile)),
                      static_cast<unsigned>((p.n + kSimtTile - 1) / kSimtTile));
      simt_gemm_kernel<<<grid, kSimtThreads, 0, s>>>(p);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

int int8_gemm_cuda(const Int8GemmParams& p, void* stream) {
  if (p.m == 0 || p.n == 0) return static_cast<int>(cudaSuccess);
  const auto s = static_cast<cudaStream_t>(stream);
  note_kernel_ran(LaunchedFamily::kInt8Gemm, p.cuda_kernel == 2 && p.k % 16 == 0 ? 2 : 1);
  if (p.cuda_kernel == 2 && p.k % 16 == 0) {
    // The quantized tensor-core kernels' tilings (as FP8): 128 x 128 when they fill the GPU.
    const int64_t big_ctas = ((p.m + 127) / 128) * ((p.n + 127) / 128);
    if (big_ctas >= multiprocessor_count()) {
      int8_mma_gemm_kernel<128, 128, 2, 4><<<static_cast<unsigned>(big_ctas), 256, 0, s>>>(p);
    } else {
      const int64_t ctas = ((p.m + 63) / 64) * ((p.n + 63) / 64);
      int8_mma_gemm_kernel<64, 64, 2, 2><<<static_cast<unsigned>(ctas), 128, 0, s>>>(p);
    }
    return static_cast<int>(cudaGetLastError());
  }
  const dim3 grid(static_cast<unsigned>((p.m + kI8Tile - 1) / kI8Tile),
                  static_cast<unsigned>((p.n + kI8Tile - 1) / kI8Tile));
  int8_gemm_kernel<<<grid, 256, 0, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

int quantize_rows_int8_cuda(const QuantizeRowsParams& p, void* stream) {
  if (p.rows == 0) return static_cast<int>(cudaSuccess);
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>(grid_size(p.rows * 32, 256));
  switch (p.x_dtype) {
    case DType::kFloat16: quantize_rows_int8_kernel<__half><<<blocks, 256, 0, s>>>(p); break;
    case DType::kBFloat16: quantize_rows_int8_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(p); break;
    default: quantize_rows_int8_kernel<float><<<blocks, 256, 0, s>>>(p); break;
  }
  return static_cast<int>(cudaGetLastError());
}

int quantize_fp8_cuda(const QuantizeFp8Params& p, void* stream) {
  const int64_t blocks_total = p.batch * ((p.rows + p.block_rows - 1) / p.block_rows) * p.col_blocks;
  if (blocks_total == 0) return static_cast<int>(cudaSuccess);
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>(grid_size(blocks_total * 32, 256));
  switch (p.x_dtype) {
    case DType::kFloat16: quantize_fp8_kernel<__half><<<blocks, 256, 0, s>>>(p); break;
    case DType::kBFloat16: quantize_fp8_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(p); break;
    default: quantize_fp8_kernel<float><<<blocks, 256, 0, s>>>(p); break;
  }
  return static_cast<int>(cudaGetLastError());
}

int fp8_gemm_cuda(const Fp8GemmParams& p, void* stream) {
  if (p.m == 0 || p.n == 0) return static_cast<int>(cudaSuccess);
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.cuda_kernel == 3 && p.k % 16 == 0) {
    cudaError_t err = cudaSuccess;
    if (launch_fp8_wgmma(p, s, err)) {
      note_kernel_ran(LaunchedFamily::kFp8Gemm, 3);
      return static_cast<int>(err);
    }
  }
  if (p.cuda_kernel >= 2 && p.k % 16 == 0) {  // v3 falls back to v2, then v1
    cudaError_t err = cudaSuccess;
    if (launch_fp8_mma(p, s, err)) {
      note_kernel_ran(LaunchedFamily::kFp8Gemm, 2);
      return static_cast<int>(err);
    }
  }
  note_kernel_ran(LaunchedFamily::kFp8Gemm, 1);
  const dim3 grid(static_cast<unsigned>(row_tiles(p, kFp8Tile)),
                  static_cast<unsigned>((p.n + kFp8Tile - 1) / kFp8Tile));
  fp8_gemm_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace dsk::gemm
