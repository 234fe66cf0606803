// FlashAttention-2 backward for sm_80+ (included by the per-dtype .cu files).
// Deterministic: no atomics, every gradient element has one writer and a fixed
// summation order. Three launches:
//   1. delta_i = <dout_i, out_i> (fp32, laid out like lse), one warp per row.
//   2. dk/dv: one block per (64-key tile, kv head, sample), each warp owning 16
//      keys, looping over the query heads of its GQA group and the query tiles
//      that can see the keys (Q/dO/lse/delta tiles double-buffered with
//      cp.async): S^T = K.Q^T, P^T = exp2(S^T * scale * log2 e - lse * log2 e),
//      dV += P^T.dO, dP^T = V.dO^T, dS^T = P^T (dP^T - delta), dK += dS^T.Q.
//      With D = 256 the dV and dK accumulators do not both fit in registers:
//      two launches, one per gradient (the scores are recomputed).
//   3. dq: one block per (64-query tile, head, sample) over the visible key
//      tiles, like the forward: S, P, dP = dO.V^T, dS, dQ += dS.K.
// Probabilities come from the saved lse; a row that saw no key (lse = -inf)
// is given lse2 = +inf so that every p = exp2(s - inf) = 0: zero gradients.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "attention/attention_cuda_common.cuh"
#include "attention/attention_fwd_kernel.cuh"
#include "attention/attention_params.h"

namespace dsk::attention {

constexpr float kLog2eF = 1.4426950408889634f;

template <int D> constexpr int bwd_stages() { return D <= 128 ? 2 : 1; }

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const AttnParams p) {
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const SeqRange r = seq_range(p, b);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
  for (int w = 0; w < 16; ++w) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlockM + warp * 16 + w;
    if (i >= r.q_len) break;
    const int64_t off = ((r.q_start + i) * p.Hq + h) * D;
    float sum = 0.f;
    for (int c = lane; c < D; c += kWarpSize) sum += to_float(out[off + c]) * to_float(dout[off + c]);
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) p.delta[lse_offset(p, b, h, r, i)] = sum;
  }
}

// lse in base 2 for p = exp2(s2 - lse2); +inf for rows that saw nothing or do not exist.
__device__ __forceinline__ float lse2_from(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2eF; }
__device__ __forceinline__ float lse2_of(const AttnParams& p, int64_t b, int64_t h,
                                         const SeqRange& r, int64_t i) {
  if (i >= r.q_len) return INFINITY;
  return lse2_from(static_cast<const float*>(p.lse)[lse_offset(p, b, h, r, i)]);
}

// A [16 x BN] score block (rows from an A tile at row a0, columns from a [n][k]
// B tile), zeroed then accumulated over D.
template <typename T, int D, int BN, int LD>
__device__ __forceinline__ void tile_scores(float (&s)[BN / 8][4], const T* a_tile, int a0,
                                            const T* b_tile, int lane) {
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    load_a_frag<T, LD>(a, a_tile, a0, ks * 16, lane);
#pragma unroll
    for (int n2 = 0; n2 < BN / 16; ++n2) {
      uint32_t bf[4];
      load_b_frags_nk<T, LD>(bf, b_tile, n2 * 16, ks * 16, lane);
      mma16816<T>(s[2 * n2], a, bf[0], bf[1]);
      mma16816<T>(s[2 * n2 + 1], a, bf[2], bf[3]);
    }
  }
}

// Stores a warp's [16 x D] fp32 accumulator * scale as T rows [row0, row0 + 16)
// of a global tile (stride elements), through the warp's own rows of `stage`.
template <typename T, int D, int LD>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float scale, T* stage,
                                           T* dst, int64_t stride, int64_t valid_rows, int lane) {
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    const int col = dt * 8 + (lane % 4) * 2;
    *reinterpret_cast<uint32_t*>(stage + (lane / 4) * LD + col) =
        pack2<T>(acc[dt][0] * scale, acc[dt][1] * scale);
    *reinterpret_cast<uint32_t*>(stage + (lane / 4 + 8) * LD + col) =
        pack2<T>(acc[dt][2] * scale, acc[dt][3] * scale);
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
  for (int c = lane; c < 16 * kChunks; c += kWarpSize) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    if (row < valid_rows)
      *reinterpret_cast<uint4*>(dst + row * stride + col) =
          *reinterpret_cast<const uint4*>(stage + row * LD + col);
  }
}

// The dK/dV kernels' per-step inputs for query tile i0 of head h into stage
// buffers: Q and dO rows (cp.async, rows past q_len zero-filled), lse2 and delta.
template <typename T, int D, int LD, int THREADS>
__device__ __forceinline__ void load_q_step(const AttnParams& p, int64_t b, int64_t h,
                                            const SeqRange& r, int64_t i0, T* sQ, T* sdO,
                                            float* sLse, float* sDelta, int tid) {
  const int64_t off = ((r.q_start + i0) * p.Hq + h) * D, q_stride = p.Hq * D;
  load_tile_async<T, D, LD, THREADS>(sQ, static_cast<const T*>(p.q) + off, q_stride, kBlockM,
                                     r.q_len - i0, tid);
  load_tile_async<T, D, LD, THREADS>(sdO, static_cast<const T*>(p.dout) + off, q_stride, kBlockM,
                                     r.q_len - i0, tid);
  if (tid < kBlockM) {
    sLse[tid] = lse2_of(p, b, h, r, i0 + tid);
    sDelta[tid] = i0 + tid < r.q_len ? p.delta[lse_offset(p, b, h, r, i0 + tid)] : 0.f;
  }
}

// A warp's scores S^T (its 16 keys x the step's NT * 8 queries) -> P^T in place;
// entries of masked keys (key_ok) or past the causal limit are 0.
template <int NT>
__device__ __forceinline__ void probs_t(float (&pt)[NT][4], const AttnParams& p,
                                        int64_t kj0, bool key_ok0, bool key_ok1, int64_t i0,
                                        int64_t shift, float scale_log2, const float* tLse,
                                        int lane) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qc = nt * 8 + (lane % 4) * 2 + (e & 1);
      const int64_t j = e < 2 ? kj0 : kj0 + 8;
      const bool ok = (e < 2 ? key_ok0 : key_ok1) && (!p.causal || j <= i0 + qc + shift);
      pt[nt][e] = ok ? fast_exp2(pt[nt][e] * scale_log2 - tLse[qc]) : 0.f;
    }
  }
}

// dP^T -> dS^T = P^T (dP^T - delta) in place.
template <int NT>
__device__ __forceinline__ void dscores_t(float (&dpt)[NT][4], const float (&pt)[NT][4],
                                          const float* tDelta, int lane) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qc = nt * 8 + (lane % 4) * 2 + (e & 1);
      dpt[nt][e] = pt[nt][e] * (dpt[nt][e] - tDelta[qc]);
    }
  }
}

template <typename T, int D>
constexpr size_t dkdv_smem_bytes() {
  return static_cast<size_t>(2 * kBlockM + 2 * bwd_stages<D>() * kBlockM) * (D + 8) * sizeof(T) +
         2 * bwd_stages<D>() * kBlockM * sizeof(float);
}

// pass: 0 = dV (and dK unless D > 128), 1 = dK only (D > 128).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(const AttnParams p,
                                                                  float scale_log2, int pass) {
  constexpr int BM = kBlockM, BN = kBlockM, LD = D + 8, kStages = bwd_stages<D>();
  constexpr bool kSplit = D > 128;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BN][LD]
  T* sV = sK + BN * LD;                     // [BN][LD]
  T* sQ = sV + BN * LD;                     // [kStages][BM][LD]
  T* sdO = sQ + kStages * BM * LD;          // [kStages][BM][LD]
  float* sLse = reinterpret_cast<float*>(sdO + kStages * BM * LD);  // [kStages][BM]
  float* sDelta = sLse + kStages * BM;                                // [kStages][BM]

  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const SeqRange r = seq_range(p, b);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  if (n0 >= r.k_len) return;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int64_t group = p.Hq / p.Hkv;
  const int64_t k_stride = p.Hkv * D;
  const int64_t keys = r.k_len - n0 < BN ? r.k_len - n0 : BN;
  const int64_t shift = r.k_len - r.q_len;
  const int64_t koff = ((r.k_start + n0) * p.Hkv + hk) * D;
  const bool* pad = p.key_padding_mask ? p.key_padding_mask + b * p.seqlen_k : nullptr;
  const bool do_dv = !kSplit || pass == 0, do_dk = !kSplit || pass == 1;

  load_tile_async<T, D, LD>(sK, static_cast<const T*>(p.k) + koff, k_stride, BN, keys, tid);
  load_tile_async<T, D, LD>(sV, static_cast<const T*>(p.v) + koff, k_stride, BN, keys, tid);
  cp_async_commit();

  const KeyTileSteps steps = key_tile_steps(p, r, n0, BM, group);
  const int64_t qt_begin = steps.qt_begin, per_head = steps.per_head, n_iter = steps.n_iter;

  auto load_q = [&](int64_t it, int st) {
    load_q_step<T, D, LD, kThreads>(p, b, hk * group + it / per_head, r,
                                    (qt_begin + it % per_head) * BM, sQ + st * BM * LD,
                                    sdO + st * BM * LD, sLse + st * BM, sDelta + st * BM, tid);
  };
  if (kStages == 2 && n_iter > 0) load_q(0, 0);
  cp_async_commit();

  float acc_a[D / 8][4];                // dV, or dK in pass 1 of a split
  float acc_b[kSplit ? 1 : D / 8][4];   // dK when not split
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc_a[i][0] = acc_a[i][1] = acc_a[i][2] = acc_a[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < (kSplit ? 1 : D / 8); ++i) acc_b[i][0] = acc_b[i][1] = acc_b[i][2] = acc_b[i][3] = 0.f;
  // This thread's two keys (relative to the sample).
  const int64_t kj0 = n0 + warp * 16 + lane / 4, kj1 = kj0 + 8;
  const bool key_ok0 = kj0 < r.k_len && !(pad && pad[kj0]);
  const bool key_ok1 = kj1 < r.k_len && !(pad && pad[kj1]);

  for (int64_t it = 0; it < n_iter; ++it) {
    int st = 0;
    if constexpr (kStages == 2) {
      st = static_cast<int>(it & 1);
      if (it + 1 < n_iter) load_q(it + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      load_q(it, 0);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* tQ = sQ + st * BM * LD;
    const T* tdO = sdO + st * BM * LD;
    const float* tLse = sLse + st * BM;
    const float* tDelta = sDelta + st * BM;
    const int64_t i0 = (qt_begin + it % per_head) * BM;

    // P^T for this warp's 16 keys x BM queries (masked entries 0).
    float pt[BM / 8][4];
    tile_scores<T, D, BM, LD>(pt, sK, warp * 16, tQ, lane);
    probs_t(pt, p, kj0, key_ok0, key_ok1, i0, shift, scale_log2, tLse, lane);
    if (do_dv) tile_accumulate<T, D, BM, LD>(acc_a, pt, tdO, lane);
    if (do_dk) {
      float dpt[BM / 8][4];
      tile_scores<T, D, BM, LD>(dpt, sV, warp * 16, tdO, lane);
      dscores_t(dpt, pt, tDelta, lane);
      if constexpr (kSplit) {
        tile_accumulate<T, D, BM, LD>(acc_a, dpt, tQ, lane);
      } else {
        tile_accumulate<T, D, BM, LD>(acc_b, dpt, tQ, lane);
      }
    }
    __syncthreads();  // this stage is refilled next
  }
  cp_async_wait<0>();
  __syncthreads();

  const int64_t valid = keys - warp * 16;
  const float scale = static_cast<float>(p.softmax_scale);
  T* dk = static_cast<T*>(p.dk) + koff + warp * 16 * k_stride;
  T* dv = static_cast<T*>(p.dv) + koff + warp * 16 * k_stride;
  if constexpr (kSplit) {
    store_rows<T, D, LD>(acc_a, pass == 0 ? 1.f : scale, sK + warp * 16 * LD, pass == 0 ? dv : dk,
                         k_stride, valid, lane);
  } else {
    store_rows<T, D, LD>(acc_a, 1.f, sV + warp * 16 * LD, dv, k_stride, valid, lane);
    store_rows<T, D, LD>(acc_b, scale, sK + warp * 16 * LD, dk, k_stride, valid, lane);
  }
}

template <typename T, int D>
constexpr size_t dq_smem_bytes() {
  return static_cast<size_t>(2 * kBlockM + 4 * fwd_block_n<D>()) * (D + 8) * sizeof(T);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(const AttnParams p,
                                                                float scale_log2) {
  constexpr int BN = fwd_block_n<D>(), LD = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kBlockM][LD]
  T* sdO = sQ + kBlockM * LD;               // [kBlockM][LD]
  T* sK = sdO + kBlockM * LD;               // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;                 // [2][BN][LD]

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const SeqRange r = seq_range(p, b);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  if (m0 >= r.q_len) return;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int64_t q_stride = p.Hq * D, k_stride = p.Hkv * D;
  const int64_t qoff = ((r.q_start + m0) * p.Hq + h) * D;
  const T* k = static_cast<const T*>(p.k) + (r.k_start * p.Hkv + hk) * D;
  const T* v = static_cast<const T*>(p.v) + (r.k_start * p.Hkv + hk) * D;
  const bool* pad = p.key_padding_mask ? p.key_padding_mask + b * p.seqlen_k : nullptr;

  const int64_t rows = r.q_len - m0 < kBlockM ? r.q_len - m0 : kBlockM;
  const int64_t shift = r.k_len - r.q_len;
  const int64_t kend = key_limit(p, r, m0 + rows - 1);  // keys the block can see
  const int n_tiles = static_cast<int>((kend + BN - 1) / BN);

  load_tile_async<T, D, LD>(sQ, static_cast<const T*>(p.q) + qoff, q_stride, kBlockM, rows, tid);
  load_tile_async<T, D, LD>(sdO, static_cast<const T*>(p.dout) + qoff, q_stride, kBlockM, rows, tid);
  cp_async_commit();
  auto load_kv = [&](int tile, int stage) {
    const int64_t j0 = static_cast<int64_t>(tile) * BN;
    load_tile_async<T, D, LD>(sK + stage * BN * LD, k + j0 * k_stride, k_stride, BN, kend - j0, tid);
    load_tile_async<T, D, LD>(sV + stage * BN * LD, v + j0 * k_stride, k_stride, BN, kend - j0, tid);
  };
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const int64_t qi0 = m0 + warp * 16 + lane / 4, qi1 = qi0 + 8;
  const float lse2[2] = {lse2_of(p, b, h, r, qi0), lse2_of(p, b, h, r, qi1)};
  const float delta[2] = {qi0 < r.q_len ? p.delta[lse_offset(p, b, h, r, qi0)] : 0.f,
                          qi1 < r.q_len ? p.delta[lse_offset(p, b, h, r, qi1)] : 0.f};
  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t & 1;
    if (t + 1 < n_tiles) load_kv(t + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* tK = sK + stage * BN * LD;
    const T* tV = sV + stage * BN * LD;
    const int64_t j0 = static_cast<int64_t>(t) * BN;
    const bool need_mask = pad || j0 + BN > r.k_len || (p.causal && j0 + BN - 1 > m0 + shift);

    float s[BN / 8][4], dp[BN / 8][4];
    tile_scores<T, D, BN, LD>(s, sQ, warp * 16, tK, lane);
    tile_scores<T, D, BN, LD>(dp, sdO, warp * 16, tV, lane);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e / 2;
        bool ok = true;
        if (need_mask) {
          const int64_t j = j0 + nt * 8 + (lane % 4) * 2 + (e & 1);
          ok = j < r.k_len && key_visible(p, pad, rr ? qi1 : qi0, j, shift);
        }
        const float pr = ok ? fast_exp2(s[nt][e] * scale_log2 - lse2[rr]) : 0.f;
        dp[nt][e] = pr * (dp[nt][e] - delta[rr]);
      }
    }
    tile_accumulate<T, D, BN, LD>(acc, dp, tK, lane);
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
  store_rows<T, D, LD>(acc, static_cast<float>(p.softmax_scale), sQ + warp * 16 * LD,
                       static_cast<T*>(p.dq) + qoff + warp * 16 * q_stride, q_stride,
                       rows - warp * 16, lane);
}

// dq = T(softmax_scale * sum of the p.dq_splits accumulators, in split order),
// four elements per thread (n, the elements of one accumulator, is a multiple of 64).
template <typename T>
__global__ void dq_convert_kernel(const float* __restrict__ acc, T* __restrict__ dq, int64_t n,
                                  int64_t splits, float scale) {
  const int64_t n4 = n / 4;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float4 v = reinterpret_cast<const float4*>(acc)[i];
    for (int64_t s = 1; s < splits; ++s) {
      const float4 w = reinterpret_cast<const float4*>(acc + s * n)[i];
      v.x += w.x;
      v.y += w.y;
      v.z += w.z;
      v.w += w.w;
    }
    uint2 o;
    o.x = pack2<T>(v.x * scale, v.y * scale);
    o.y = pack2<T>(v.z * scale, v.w * scale);
    reinterpret_cast<uint2*>(dq)[i] = o;
  }
}

// The last kernel of backward v2 and v3: p.dq from p.dq_accum.
template <typename T>
int launch_dq_convert(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = p.cu_seqlens_q ? p.total_q : p.B * p.seqlen_q;
  const int64_t n = rows * p.Hq * p.D;
  if (n == 0) return cudaSuccess;
  constexpr int kConvertThreads = 256;
  const int64_t blocks = (n / 4 + kConvertThreads - 1) / kConvertThreads;
  dq_convert_kernel<T><<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kConvertThreads, 0,
                         stream>>>(p.dq_accum, static_cast<T*>(p.dq), n, p.dq_splits,
                                   static_cast<float>(p.softmax_scale));
  return cudaGetLastError();
}

template <typename T, int D>
int launch_bwd(const AttnParams& p, cudaStream_t stream) {
  const float scale_log2 = softmax_scale_log2(p);
  const dim3 q_grid = query_tile_grid(p, kBlockM);
  const dim3 k_grid(static_cast<unsigned>((p.seqlen_k + kBlockM - 1) / kBlockM),
                    static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B));
  if (p.seqlen_q > 0) {
    attention_delta_kernel<T, D><<<q_grid, kThreads, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.seqlen_k > 0) {
    constexpr size_t smem = dkdv_smem_bytes<T, D>();
    cudaError_t err = allow_smem(attention_dkdv_kernel<T, D>, smem);
    if (err != cudaSuccess) return err;
    for (int pass = 0; pass < (D > 128 ? 2 : 1); ++pass) {
      attention_dkdv_kernel<T, D><<<k_grid, kThreads, smem, stream>>>(p, scale_log2, pass);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  if (p.seqlen_q > 0) {
    constexpr size_t smem = dq_smem_bytes<T, D>();
    cudaError_t err = allow_smem(attention_dq_kernel<T, D>, smem);
    if (err != cudaSuccess) return err;
    attention_dq_kernel<T, D><<<q_grid, kThreads, smem, stream>>>(p, scale_log2);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template <typename T>
int launch_bwd_any(const AttnParams& p, cudaStream_t stream) {
  return with_cuda_head_dim(p.D, [&](auto d) { return launch_bwd<T, decltype(d)::value>(p, stream); });
}

}  // namespace dsk::attention
