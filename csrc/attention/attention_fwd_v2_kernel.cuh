// FlashAttention-2 forward, generation 2 (sm_80+), for D = 64 and 128; the
// default for D = 64, and for D = 128 where v3 cannot run (attention_api.cpp:
// DSK_ATTENTION_KERNEL / _attention_cuda_kernel); every other case runs v1
// (attention_fwd_kernel.cuh). Same semantics and numerics as v1 (fp32
// accumulation, P rounded to T for the P.V mma, base-2 online softmax, the same
// masking rules); what changes is the work split:
//
// - 128 query rows per CTA, 4 warps, 32 rows (two m16 tiles) per warp: every
//   K / V fragment read from shared memory (ldmatrix) now feeds 4 mma instead
//   of 2, halving the shared-memory traffic per FLOP that bounded v1 (a 16-row
//   warp needs 256 B of ldmatrix per m16n8k16, more than an SM's shared
//   bandwidth keeps up with at mma.sync rate).
// - K and V stream through separate single-buffered stages, as in
//   FlashAttention-2: V(t) is requested before S = Q.K(t)^T is computed and
//   K(t + 1) as soon as every warp is done with K(t), so each load overlaps a
//   whole phase of compute; smem stays small (70 KB at D = 128) so two CTAs
//   share an SM and hide each other's waits.
// - Q stays in registers for D = 64; for D = 128 the registers go to the
//   32 x 128 fp32 output accumulator and Q fragments are re-read from shared
//   memory per key tile (no spills; the reads are a third of the K reads).
// - P goes from the S accumulators straight into A fragments (C layout = A
//   layout), the row max/sum need only the 4 lanes of a quad, and masking runs
//   only on tiles that reach a boundary, padding or the causal diagonal.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "attention/attention_cuda_common.cuh"
#include "attention/attention_params.h"

namespace dsk::attention::fwd_v2 {

constexpr int kBlockM = 128;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;  // load_tile_async assumes 128
constexpr int kWarpRows = kBlockM / kWarps;   // 32
constexpr int kMTiles = kWarpRows / 16;       // m16 tiles per warp

// Keys per K / V tile. 64, except D = 128 compiled for sm_8x, where ptxas
// spills with a 32 x 64 S tile next to the 32 x 128 accumulator (it does not
// for sm_90a); the host sizes shared memory for 64 (the host pass has no
// __CUDA_ARCH__), which covers both.
template <int D>
__host__ __device__ constexpr int block_n() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return D <= 64 ? 64 : 32;
#else
  return 64;
#endif
}
template <int D> constexpr bool q_in_regs() { return D <= 64; }

// Q tile + one K tile + one V tile, rows padded by 8 elements (16 B) so the 8
// row addresses of an ldmatrix phase fall in distinct banks.
template <typename T, int D>
constexpr size_t smem_bytes() {
  return static_cast<size_t>(kBlockM + 2 * block_n<D>()) * (D + 8) * sizeof(T);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(const AttnParams p, float scale_log2) {
  constexpr int BN = block_n<D>(), LD = D + 8, NT = BN / 8, DT = D / 8, KS = D / 16;
  constexpr bool kQRegs = q_in_regs<D>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kBlockM][LD]
  T* sK = sQ + kBlockM * LD;                // [BN][LD]
  T* sV = sK + BN * LD;                     // [BN][LD]

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const SeqRange r = seq_range(p, b);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  if (m0 >= r.q_len) return;  // varlen: this sample is shorter than max_seqlen_q
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

  // K / V tile loader: thread tid copies 16-byte chunk (tid % kChunks) of rows
  // tid / kChunks + i * kRowStep; only a base offset and a row counter stay
  // live across the loop (fewer registers than a generic tile loop). Rows past
  // kend are zero-filled: finite scores, zero V rows.
  constexpr int kChunks = D / 8, kRowStep = kThreads / kChunks, kPasses = BN / kRowStep;
  const int ld_row = tid / kChunks;
  const int64_t ld_off = ld_row * k_stride + (tid % kChunks) * 8;
  T* const sK_dst = sK + ld_row * LD + (tid % kChunks) * 8;
  T* const sV_dst = sV + ld_row * LD + (tid % kChunks) * 8;
  auto load_kv = [&](const T* base, T* dst, int tile) {
    const int64_t j0 = static_cast<int64_t>(tile) * BN;
    const T* src = base + j0 * k_stride + ld_off;
    const int64_t left = kend - j0 - ld_row;  // this thread's rows still inside
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const bool ok = i * kRowStep < left;
      cp_async_16(shared_addr(dst + i * kRowStep * LD), ok ? src : base, ok);
      src += kRowStep * k_stride;
    }
  };
  auto load_k = [&](int tile) { load_kv(k, sK_dst, tile); };
  auto load_v = [&](int tile) { load_kv(v, sV_dst, tile); };
  load_tile_async<T, D, LD>(sQ, q, q_stride, kBlockM, rows, tid);
  if (n_tiles > 0) load_k(0);
  cp_async_commit();

  const int wrow = warp * kWarpRows;  // the warp's first row in the tile
  float acc[kMTiles][DT][4];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
    for (int i = 0; i < DT; ++i) acc[mi][i][0] = acc[mi][i][1] = acc[mi][i][2] = acc[mi][i][3] = 0.f;
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
    row_max[mi][0] = row_max[mi][1] = -INFINITY;
    row_sum[mi][0] = row_sum[mi][1] = 0.f;
  }
  uint32_t qf[kQRegs ? kMTiles : 1][kQRegs ? KS : 1][4];
  // Sample-relative query row of element pair rr (0: lane / 4, 1: + 8) of m tile mi.
  auto qrow = [&](int mi, int rr) -> int64_t { return m0 + wrow + mi * 16 + lane / 4 + rr * 8; };

  for (int t = 0; t < n_tiles; ++t) {
    // K(t) (and Q at t = 0) have landed for every thread; every warp is past
    // the previous P.V, so the V stage may be refilled.
    cp_async_wait<0>();
    __syncthreads();
    load_v(t);
    cp_async_commit();
    if constexpr (kQRegs) {
      if (t == 0) {
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
          for (int ks = 0; ks < KS; ++ks) load_a_frag<T, LD>(qf[mi][ks], sQ, wrow + mi * 16, ks * 16, lane);
      }
    }

    // S = Q.K^T: each K fragment feeds both m tiles.
    float s[kMTiles][NT][4];
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
      for (int i = 0; i < NT; ++i) s[mi][i][0] = s[mi][i][1] = s[mi][i][2] = s[mi][i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        if constexpr (kQRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mi][e] = qf[mi][ks][e];
        } else {
          load_a_frag<T, LD>(a[mi], sQ, wrow + mi * 16, ks * 16, lane);
        }
      }
#pragma unroll
      for (int n2 = 0; n2 < BN / 16; ++n2) {
        uint32_t bf[4];
        load_b_frags_nk<T, LD>(bf, sK, n2 * 16, ks * 16, lane);
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
          mma16816<T>(s[mi][2 * n2], a[mi], bf[0], bf[1]);
          mma16816<T>(s[mi][2 * n2 + 1], a[mi], bf[2], bf[3]);
        }
      }
    }

    // Every warp is done reading K(t): fetch K(t + 1) during softmax and P.V.
    __syncthreads();
    if (t + 1 < n_tiles) load_k(t + 1);
    cp_async_commit();  // possibly empty: keeps the group count uniform

    // Scale into base-2 units (before masking, so a zero scale cannot turn a
    // masked -inf into NaN); mask only tiles that reach past the last key,
    // touch padding, or cross the causal diagonal of the block's first row.
    const int64_t j0 = static_cast<int64_t>(t) * BN;
    const bool need_mask = pad || j0 + BN > r.k_len || (p.causal && j0 + BN - 1 > m0 + shift);
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mi][nt][e] *= scale_log2;
    if (need_mask) {
      // Tile-relative 32-bit bounds (fewer live registers than int64 indices):
      // key jl of the tile exists when jl < k_lim and row (mi, rr) sees it
      // causally when jl <= c_lim[mi][rr].
      const int k_lim = r.k_len - j0 < BN ? static_cast<int>(r.k_len - j0) : BN;
      int c_lim[kMTiles][2];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int64_t cl = p.causal ? qrow(mi, rr) + shift - j0 : BN;
          c_lim[mi][rr] = cl < -1 ? -1 : (cl > BN ? BN : static_cast<int>(cl));
        }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          // Column jl is the same for both m tiles and both rows: test the
          // padding once per column.
          const int jl = nt * 8 + (lane % 4) * 2 + c;
          const bool col_ok = jl < k_lim && !(pad && pad[j0 + jl]);
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
              if (!col_ok || jl > c_lim[mi][rr]) s[mi][nt][2 * rr + c] = -INFINITY;
        }
      }
    }

    // Online softmax for each of the thread's 4 rows (m tile mi, pair rr).
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
      online_softmax_step(s[mi], acc[mi], row_max[mi], row_sum[mi]);
    }

    // V(t) has landed (only K(t + 1), the newest group, may still be in flight).
    cp_async_wait<1>();
    __syncthreads();

    // O += P.V: P straight from the S accumulators; each V fragment
    // (ldmatrix.trans of the [key][d] tile) feeds both m tiles.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) c_to_a<T>(a[mi], s[mi][2 * kk], s[mi][2 * kk + 1]);
#pragma unroll
      for (int d2 = 0; d2 < D / 16; ++d2) {
        uint32_t bf[4];
        load_b_frags_kn<T, LD>(bf, sV, kk * 16, d2 * 16, lane);
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
          mma16816<T>(acc[mi][2 * d2], a[mi], bf[0], bf[1]);
          mma16816<T>(acc[mi][2 * d2 + 1], a[mi], bf[2], bf[3]);
        }
      }
    }
  }
  // Q's copy (when there was no key tile) or a last empty group; other threads'
  // copies into this warp's rows of sQ must be complete before they are reused.
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: normalise, stage the warp's 32 rows in its own rows of sQ (only
  // this warp ever read them), then 16-byte coalesced stores; lse = (max +
  // log2(sum)) * ln 2, -inf for a row that saw no key.
  T* sO = sQ + wrow * LD;
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
    float inv[2], lse[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float l = row_sum[mi][rr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      finish_row(l, row_max[mi][rr], inv[rr], lse[rr]);
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int col = dt * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(sO + (mi * 16 + lane / 4) * LD + col) =
          pack2<T>(acc[mi][dt][0] * inv[0], acc[mi][dt][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(sO + (mi * 16 + lane / 4 + 8) * LD + col) =
          pack2<T>(acc[mi][dt][2] * inv[1], acc[mi][dt][3] * inv[1]);
    }
    if (lane % 4 == 0) {
      float* lse_out = static_cast<float*>(p.lse);
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int64_t i = qrow(mi, rr);
        if (i < r.q_len) lse_out[lse_offset(p, b, h, r, i)] = lse[rr];
      }
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + ((r.q_start + m0 + wrow) * p.Hq + h) * D;
  for (int c = lane; c < kWarpRows * kChunks; c += kWarpSize) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    if (m0 + wrow + row < r.q_len)
      *reinterpret_cast<uint4*>(out + row * q_stride + col) =
          *reinterpret_cast<const uint4*>(sO + row * LD + col);
  }
}

template <typename T, int D>
int launch(const AttnParams& p, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<T, D>();
  auto kernel = fwd_kernel<T, D>;
  const cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<query_tile_grid(p, kBlockM), kThreads, smem, stream>>>(p, softmax_scale_log2(p));
  return cudaGetLastError();
}

// The head dims v2 is compiled for (the caller falls back to v1 otherwise).
template <typename T>
int launch_any(const AttnParams& p, cudaStream_t stream) {
  return with_head_dim_64_128(p.D, static_cast<int>(cudaErrorInvalidValue),
                              [&](auto d) { return launch<T, decltype(d)::value>(p, stream); });
}

}  // namespace dsk::attention::fwd_v2
