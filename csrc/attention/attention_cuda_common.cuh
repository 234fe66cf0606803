// Warp-level building blocks of the attention kernels (sm_80+): tensor-core
// mma.sync m16n8k16 with fp32 accumulators, ldmatrix fragment loads from
// shared memory, and a 64 x D tile loader over cp.async (common/cuda_utils.cuh).
// No torch headers.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16/.bf16; g = lane / 4, t = lane % 4):
//   A 16x16 (row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 ("col"):      b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C 16x8 fp32:         c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// So two adjacent C tiles (n = 0..15) are exactly the A fragment of a k = 16
// step: softmax probabilities feed the next mma without leaving registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention/attention_params.h"
#include "common/cuda_utils.cuh"

namespace dsk::attention {

// Host side of the launchers.

// The scale the kernels multiply scores by before exp2: softmax_scale * log2(e), in fp32.
inline float softmax_scale_log2(const AttnParams& p) {
  return static_cast<float>(p.softmax_scale * kLog2e);
}

// One CTA per (query tile of block_m rows, query head, sample).
inline dim3 query_tile_grid(const AttnParams& p, int64_t block_m) {
  return dim3(static_cast<unsigned>((p.seqlen_q + block_m - 1) / block_m), static_cast<unsigned>(p.Hq),
              static_cast<unsigned>(p.B));
}

// f(std::integral_constant<int, D>{}) for the head dim D = d of the v1 kernels (16,
// 32, 64, 96, 128 or 256: cuda_head_dim_supported); cudaErrorInvalidValue otherwise.
template <typename F>
int with_cuda_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: return cudaErrorInvalidValue;
  }
}

// f(std::integral_constant<int, D>{}) for D = d of the v2 and v3 kernels (64 or
// 128); `fallback` for any other d (the caller then runs an older generation).
template <typename R, typename F>
R with_head_dim_64_128(int64_t d, R fallback, F&& f) {
  switch (d) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return fallback;
  }
}

// Raises a kernel's dynamic shared memory limit to `bytes`.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_addr(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_addr(row)));
}

// 2^x with the hardware approximation (relative error ~2^-22); 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats as one register of T pair (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// rows x D tile of T at `src` (row stride `stride` elements) into shared memory
// (row stride LD elements) with THREADS threads; rows >= valid_rows are zero-filled
// so padding never injects NaN/Inf garbage into the mma.
template <typename T, int D, int LD, int THREADS = 128>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, int64_t stride, int rows,
                                                int64_t valid_rows, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = tid; c < rows * kChunks; c += THREADS) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = row < valid_rows;
    cp_async_16(shared_addr(dst + row * LD + col), ok ? src + row * stride + col : src, ok);
  }
}

// A fragment of rows [r0, r0 + 16) x cols [c0, c0 + 16) of a row-major shared tile.
template <typename T, int LD>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* tile, int r0, int c0,
                                            int lane) {
  ldmatrix_x4(a, tile + (r0 + (lane % 16)) * LD + c0 + (lane / 16) * 8);
}

// B fragments of two n-tiles (n0..n0+7 -> b[0], b[1]; n0+8.. -> b[2], b[3]) for a
// k-step at c0, where the shared tile is stored [n][k] (e.g. K for Q.K^T).
template <typename T, int LD>
__device__ __forceinline__ void load_b_frags_nk(uint32_t (&b)[4], const T* tile, int n0, int c0,
                                                int lane) {
  ldmatrix_x4(b, tile + (n0 + (lane / 16) * 8 + lane % 8) * LD + c0 + ((lane / 8) % 2) * 8);
}

// The same where the shared tile is stored [k][n] (e.g. V for P.V): transposed load.
template <typename T, int LD>
__device__ __forceinline__ void load_b_frags_kn(uint32_t (&b)[4], const T* tile, int k0, int n0,
                                                int lane) {
  ldmatrix_x4_trans(b, tile + (k0 + ((lane / 8) % 2) * 8 + lane % 8) * LD + n0 + (lane / 16) * 8);
}

// A fragment of rows [r0, r0 + 16) x cols [c0, c0 + 16) of a matrix stored
// transposed ([col][row], e.g. dS kept as dS^T): matrix m of the x4 load is
// (rows + (m % 2) * 8, cols + (m / 2) * 8), read from stored rows c0 + (m / 2) * 8.
template <typename T, int LD>
__device__ __forceinline__ void load_a_frag_trans(uint32_t (&a)[4], const T* tile_t, int r0, int c0,
                                                  int lane) {
  ldmatrix_x4_trans(a, tile_t + (c0 + (lane / 16) * 8 + lane % 8) * LD + r0 + ((lane / 8) % 2) * 8);
}

// The A fragment of a k = 16 step from two fp32 C tiles (see the layout note).
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// One online-softmax step for the thread's two rows of a 16-row warp tile (rows
// lane / 4 and + 8: elements 0, 1 and 2, 3 of each C tile; the quad's 4 lanes
// hold a row): s, scores in base-2 units (-inf where masked), becomes
// p = exp2(s - running max); the running max and sum, and the output
// accumulators acc, are rescaled by exp2(old max - new max). A row that has seen
// no key yet keeps every p at exp2(-inf) = 0.
template <int NT, int DT>
__device__ __forceinline__ void online_softmax_step(float (&s)[NT][4], float (&acc)[DT][4],
                                                    float (&row_max)[2], float (&row_sum)[2]) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(row_max[rr], mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = fast_exp2(row_max[rr] - m_use);
    row_max[rr] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      s[nt][2 * rr] = fast_exp2(s[nt][2 * rr] - m_use);
      s[nt][2 * rr + 1] = fast_exp2(s[nt][2 * rr + 1] - m_use);
      sum += s[nt][2 * rr] + s[nt][2 * rr + 1];
    }
    row_sum[rr] = row_sum[rr] * alpha + sum;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      acc[dt][2 * rr] *= alpha;
      acc[dt][2 * rr + 1] *= alpha;
    }
  }
}

// A row's epilogue from its quad-reduced sum l and running max (base 2):
// inv = 1 / l and lse = (max + log2 l) * ln 2. A row that saw no key (l = 0)
// gets inv = 0 and lse = -inf; a row whose scores held a NaN or +inf has
// l = NaN (exp2 of NaN, or of inf - inf) and gets NaN for both, so the NaN
// reaches out and lse instead of vanishing into a zero row.
__device__ __forceinline__ void finish_row(float l, float row_max, float& inv, float& lse) {
  inv = l == 0.f ? 0.f : 1.f / l;
  lse = l == 0.f ? -INFINITY : (row_max + log2f(l)) * 0.69314718055994531f;
}

// acc[16 x D] += c[16 x BN] . tile[BN x D] (tile stored [k][n]): c, fp32 C tiles,
// rounded to T as the A fragments (P.V, dS.K, ...).
template <typename T, int D, int BN, int LD>
__device__ __forceinline__ void tile_accumulate(float (&acc)[D / 8][4], const float (&c)[BN / 8][4],
                                                const T* tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    uint32_t a[4];
    c_to_a<T>(a, c[2 * kk], c[2 * kk + 1]);
#pragma unroll
    for (int d2 = 0; d2 < D / 16; ++d2) {
      uint32_t bf[4];
      load_b_frags_kn<T, LD>(bf, tile, kk * 16, d2 * 16, lane);
      mma16816<T>(acc[2 * d2], a, bf[0], bf[1]);
      mma16816<T>(acc[2 * d2 + 1], a, bf[2], bf[3]);
    }
  }
}

}  // namespace dsk::attention
