// FlashAttention-2 forward for sm_80+ (included by the per-dtype .cu files).
//
// One block of 4 warps per (64-query tile, query head, sample); each warp owns
// 16 query rows. The Q tile is loaded once (cp.async) and, for D <= 128, kept
// in registers as mma A fragments; K/V tiles of kBlockN keys stream through a
// double-buffered cp.async pipeline (tile t + 1 loads while tile t computes),
// one pass over the visible keys. Per tile: S = Q.K^T on tensor cores (fp32),
// masking (tail keys, key padding, bottom-right causal) only on tiles that need
// it, online softmax in base 2 (scale * log2(e) folded into one multiply, row
// max / sum kept per thread and combined across the 4 lanes of a row), then
// O += P.V with P reused from registers. Shared tiles have 8 elements of row
// padding so ldmatrix rows hit distinct banks. All offsets are int64.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "attention/attention_cuda_common.cuh"
#include "attention/attention_params.h"

namespace dsk::attention {

constexpr int kBlockM = 64;
constexpr int kThreads = 128;

template <int D> constexpr int fwd_block_n() { return D <= 128 ? 64 : 32; }

template <typename T, int D>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(kBlockM + 4 * fwd_block_n<D>()) * (D + 8) * sizeof(T);
}

// Whether query i sees key j (j < k_len is checked by the caller).
__device__ __forceinline__ bool key_visible(const AttnParams& p, const bool* pad, int64_t i,
                                            int64_t j, int64_t shift) {
  return (!p.causal || j <= i + shift) && !(pad && pad[j]);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttnParams p,
                                                                 float scale_log2) {
  constexpr int BN = fwd_block_n<D>(), LD = D + 8;
  constexpr bool kQInRegs = D <= 128;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kBlockM][LD]
  T* sK = sQ + kBlockM * LD;                // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;                 // [2][BN][LD]

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const SeqRange r = seq_range(p, b);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  if (m0 >= r.q_len) return;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int64_t q_stride = p.Hq * D, k_stride = p.Hkv * D;
  const T* q = static_cast<const T*>(p.q) + ((r.q_start + m0) * p.Hq + h) * D;
  const T* k = static_cast<const T*>(p.k) + (r.k_start * p.Hkv + hk) * D;
  const T* v = static_cast<const T*>(p.v) + (r.k_start * p.Hkv + hk) * D;
  const bool* pad = p.key_padding_mask ? p.key_padding_mask + b * p.seqlen_k : nullptr;

  const int64_t rows = r.q_len - m0 < kBlockM ? r.q_len - m0 : kBlockM;
  const int64_t shift = r.k_len - r.q_len;  // causal: query i sees j <= i + shift
  // Keys past the causal limit of the block's last row are never loaded.
  const int64_t kend = key_limit(p, r, m0 + rows - 1);
  const int n_tiles = static_cast<int>((kend + BN - 1) / BN);

  load_tile_async<T, D, LD>(sQ, q, q_stride, kBlockM, rows, tid);
  cp_async_commit();
  auto load_kv = [&](int tile, int stage) {
    const int64_t j0 = static_cast<int64_t>(tile) * BN;
    load_tile_async<T, D, LD>(sK + stage * BN * LD, k + j0 * k_stride, k_stride, BN, kend - j0, tid);
    load_tile_async<T, D, LD>(sV + stage * BN * LD, v + j0 * k_stride, k_stride, BN, kend - j0, tid);
  };
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  uint32_t qf[kQInRegs ? D / 16 : 1][4];
  // This thread's two query rows (relative to the sample).
  const int64_t qi0 = m0 + warp * 16 + lane / 4, qi1 = qi0 + 8;

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t & 1;
    if (t + 1 < n_tiles) load_kv(t + 1, stage ^ 1);
    cp_async_commit();  // possibly empty: keeps the group count uniform
    cp_async_wait<1>();
    __syncthreads();
    if (kQInRegs && t == 0) {
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) load_a_frag<T, LD>(qf[kQInRegs ? ks : 0], sQ, warp * 16, ks * 16, lane);
    }
    const T* tK = sK + stage * BN * LD;
    const T* tV = sV + stage * BN * LD;

    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[4];
      if constexpr (kQInRegs) {
        a[0] = qf[ks][0]; a[1] = qf[ks][1]; a[2] = qf[ks][2]; a[3] = qf[ks][3];
      } else {
        load_a_frag<T, LD>(a, sQ, warp * 16, ks * 16, lane);
      }
#pragma unroll
      for (int n2 = 0; n2 < BN / 16; ++n2) {
        uint32_t bf[4];
        load_b_frags_nk<T, LD>(bf, tK, n2 * 16, ks * 16, lane);
        mma16816<T>(s[2 * n2], a, bf[0], bf[1]);
        mma16816<T>(s[2 * n2 + 1], a, bf[2], bf[3]);
      }
    }

    // Scale into base-2 units; mask only tiles that reach past the last key,
    // touch padding, or cross the causal diagonal of the block's first row.
    const int64_t j0 = static_cast<int64_t>(t) * BN;
    const bool need_mask = pad || j0 + BN > r.k_len || (p.causal && j0 + BN - 1 > m0 + shift);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale_log2;
        if (need_mask) {
          const int64_t j = j0 + nt * 8 + (lane % 4) * 2 + (e & 1);
          const int64_t i = e < 2 ? qi0 : qi1;
          if (!(j < r.k_len && key_visible(p, pad, i, j, shift))) x = -INFINITY;
        }
        s[nt][e] = x;
      }
    }

    // Online softmax for rows qi0 (elements 0, 1) and qi1 (2, 3), then O += P.V
    // with P straight from the S accumulators.
    online_softmax_step(s, acc, row_max, row_sum);
    tile_accumulate<T, D, BN, LD>(acc, s, tV, lane);
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: normalise, stage the warp's 16 rows in its own rows of sQ, then
  // 16-byte coalesced stores; lse = (max + log2(sum)) * ln 2.
  float inv[2], lse[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = row_sum[rr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    finish_row(l, row_max[rr], inv[rr], lse[rr]);
  }
  T* sO = sQ + warp * 16 * LD;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    const int col = dt * 8 + (lane % 4) * 2;
    *reinterpret_cast<uint32_t*>(sO + (lane / 4) * LD + col) =
        pack2<T>(acc[dt][0] * inv[0], acc[dt][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(sO + (lane / 4 + 8) * LD + col) =
        pack2<T>(acc[dt][2] * inv[1], acc[dt][3] * inv[1]);
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + ((r.q_start + m0 + warp * 16) * p.Hq + h) * D;
  constexpr int kChunks = D / 8;
  for (int c = lane; c < 16 * kChunks; c += kWarpSize) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    if (m0 + warp * 16 + row < r.q_len)
      *reinterpret_cast<uint4*>(out + row * q_stride + col) =
          *reinterpret_cast<const uint4*>(sO + row * LD + col);
  }
  if (lane % 4 == 0) {
    float* lse_out = static_cast<float*>(p.lse);
    if (qi0 < r.q_len) lse_out[lse_offset(p, b, h, r, qi0)] = lse[0];
    if (qi1 < r.q_len) lse_out[lse_offset(p, b, h, r, qi1)] = lse[1];
  }
}

template <typename T, int D>
int launch_fwd(const AttnParams& p, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem_bytes<T, D>();
  auto kernel = attention_fwd_kernel<T, D>;
  const cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<query_tile_grid(p, kBlockM), kThreads, smem, stream>>>(p, softmax_scale_log2(p));
  return cudaGetLastError();
}

// Every supported head dim for one dtype.
template <typename T>
int launch_fwd_any(const AttnParams& p, cudaStream_t stream) {
  return with_cuda_head_dim(p.D, [&](auto d) { return launch_fwd<T, decltype(d)::value>(p, stream); });
}

}  // namespace dsk::attention
