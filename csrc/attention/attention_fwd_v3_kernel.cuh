// FlashAttention forward, generation 3: Hopper tensor cores (wgmma, sm_90a) for
// D = 64 and 128; the default for D = 128 (kAttentionFwdAuto), forced with
// DSK_ATTENTION_KERNEL=v3 / _attention_cuda_kernel(3); where it cannot run (no
// sm_90a build or GPU, other D) v2 runs, then v1. Same semantics and numerics
// as v1/v2 (fp32 accumulation, P rounded to T for P.V, base-2 online softmax,
// the same masking rules); what changes is the matrix unit:
//
// - 128 query rows per CTA in two warpgroups of 64 rows. S = Q.K^T is one
//   wgmma m64n128k16 per 16 of D with both operands read from shared memory
//   (Q and K in the 128-byte swizzled K-major layout of common/sm90.cuh, D = 128
//   as two 64-column blocks); O += P.V is one wgmma m64n{D}k16 per 16 keys
//   with P taken from registers (the S accumulators' layout per warp is
//   mma.sync's, so the softmax and the C-to-A repacking are v2's) and V read
//   as an MN-major operand: V's tile is copied exactly like K's (keys as rows),
//   the descriptor and imm-trans-b = 1 make wgmma read it transposed.
// - K and V tiles of 128 keys in three stages: the copies of tile t + 1
//   (cp.async, zero-filled past the last key), issued right after tile t's
//   Q.K^T wgmma, run during tile t's math; tile t's P.V is not waited for
//   until tile t + 1's Q.K^T is issued, so the tensor cores run it across the
//   barrier (its stage is refilled only two tiles later, and P's registers
//   stay untouched until that wait). The last query block goes first. One
//   barrier per tile publishes a stage (after each thread's fence.proxy.async:
//   wgmma reads shared memory through the async proxy) and, because every
//   warpgroup waited for its wgmma up to tile t - 2's P.V before it, frees
//   stage (t + 1) % 3 for tile t + 1's copies.
// - Q once per CTA; output staged through the (then free) K stages for
//   16-byte coalesced stores; lse as v2.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "attention/attention_cuda_common.cuh"
#include "attention/attention_params.h"
#include "common/sm90.cuh"

namespace dsk::attention::fwd_v3 {

constexpr int kBlockM = 128;  // query rows per CTA: two warpgroups of 64
constexpr int kBlockN = 128;  // keys per tile
constexpr int kThreads = 256;
constexpr int kStages = 3;  // tile t + 1 loads while t computes and t - 1's P.V may still run

// A [rows][D] tile in D / 64 column blocks of rows x 128 bytes.
template <int D> constexpr int tile_bytes(int rows) { return rows * D * 2; }
// Q, then K[kStages], then V[kStages], each 1 KiB aligned; + 1 KiB to align the base.
template <int D> constexpr int smem_bytes() {
  return tile_bytes<D>(kBlockM) + 2 * kStages * tile_bytes<D>(kBlockN) + 1024;
}
static_assert(tile_bytes<64>(kBlockN) % 1024 == 0 && smem_bytes<128>() <= 227 * 1024,
              "fwd v3 tiles must sit on 1 KiB swizzle atoms and fit an sm_90 CTA");

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(const AttnParams p, float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = kBlockN, NT = BN / 8, DT = D / 8, KS = D / 16;
  constexpr int kTile = tile_bytes<D>(BN);
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t base = (shared_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base, sK = sQ + tile_bytes<D>(kBlockM), sV = sK + kStages * kTile;

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const SeqRange r = seq_range(p, b);
  // Last query block first: with a causal mask it has the most keys to visit.
  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;
  if (m0 >= r.q_len) return;  // varlen: this sample is shorter than max_seqlen_q
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
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

  // ROWS rows of `src` (row stride in elements), valid_rows of them real, into
  // the swizzled column blocks at `dst`.
  auto load_tile = [&](uint32_t dst, const T* src, int64_t stride, int64_t valid_rows) {
#pragma unroll
    for (int cb = 0; cb < D / 64; ++cb)
      load_swizzled_rows<kBlockN, kThreads>(dst + cb * kBlockN * 128, src, 0, valid_rows, cb * 128,
                                            D * 2, stride * 2);
  };
  static_assert(kBlockM == kBlockN, "load_tile serves Q and K/V tiles alike");
  auto load_kv = [&](int t, int stage) {
    const int64_t j0 = static_cast<int64_t>(t) * BN;
    load_tile(sK + stage * kTile, k + j0 * k_stride, k_stride, kend - j0);
    load_tile(sV + stage * kTile, v + j0 * k_stride, k_stride, kend - j0);
  };
  load_tile(sQ, q, q_stride, rows);
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  // This thread's rows of the tile: warpgroup wg, warp, lane / 4 (+ 8).
  const int wrow = wg * 64 + warp * 16;
  auto qrow = [&](int rr) -> int64_t { return m0 + wrow + lane / 4 + rr * 8; };
  float o[1][DT][4], s[1][NT][4];  // wgmma accumulators (S is overwritten by its first step)
#pragma unroll
  for (int i = 0; i < DT; ++i) o[0][i][0] = o[0][i][1] = o[0][i][2] = o[0][i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < NT; ++i) s[0][i][0] = s[0][i][1] = s[0][i][2] = s[0][i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  uint32_t pf[BN / 16][4];  // P of the tile whose P.V may be in flight

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t % kStages;
    // K(t), V(t) (and Q) landed for every thread; the fence hands each thread's
    // copies to the async proxy and the barrier everyone's. Every warpgroup
    // waited for its wgmma up to tile t - 2's P.V before it: stage (t + 1) % 3,
    // last read by tile t - 2, is free.
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();

    // S = Q.K^T (this warpgroup's 64 rows x 128 keys), D / 16 steps; the copies
    // of tile t + 1 are issued while they run.
    const uint32_t q_base = sQ + wg * 64 * 128, k_base = sK + stage * kTile;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const uint32_t off = (ks / 4) * kBlockN * 128 + (ks % 4) * 32;  // column block, 16 of K
      wgmma_m64n128k16_ss<T>(s, wgmma_desc(q_base + off), wgmma_desc(k_base + off), ks > 0);
    }
    wgmma_commit();
    if (t + 1 < n_tiles) load_kv(t + 1, (t + 1) % kStages);
    cp_async_commit();
    wgmma_wait<0>();  // this Q.K^T and tile t - 1's P.V: O and P are free again
    pin_accumulators(o);
    pin_fragments(pf);
    pin_accumulators(s);

    // Scale into base-2 units, then mask (as v2) only tiles that reach past the
    // last key, touch padding, or cross the causal diagonal of the block's first row.
    const int64_t j0 = static_cast<int64_t>(t) * BN;
    const bool need_mask = pad || j0 + BN > r.k_len || (p.causal && j0 + BN - 1 > m0 + shift);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nt][e] *= scale_log2;
    if (need_mask) {
      const int k_lim = r.k_len - j0 < BN ? static_cast<int>(r.k_len - j0) : BN;
      int c_lim[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int64_t cl = p.causal ? qrow(rr) + shift - j0 : BN;
        c_lim[rr] = cl < -1 ? -1 : (cl > BN ? BN : static_cast<int>(cl));
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int jl = nt * 8 + (lane % 4) * 2 + c;
          const bool col_ok = jl < k_lim && !(pad && pad[j0 + jl]);
#pragma unroll
          for (int rr = 0; rr < 2; ++rr)
            if (!col_ok || jl > c_lim[rr]) s[0][nt][2 * rr + c] = -INFINITY;
        }
    }

    // Online softmax of the thread's 2 rows (the quad's 4 lanes hold a row).
    online_softmax_step(s[0], o[0], row_max, row_sum);

    // O += P.V: P packed from the S accumulators (all of it before the first
    // wgmma, kept unchanged until the wait), V(t) as an MN-major operand whose
    // 64-column blocks lie kBlockN * 128 bytes apart; 16 keys = 2048 bytes.
    // Waited for at the next tile's Q.K^T (or after the loop).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) c_to_a<T>(pf[kk], s[0][2 * kk], s[0][2 * kk + 1]);
    const uint32_t v_base = sV + stage * kTile;
    pin_fragments(pf);  // written before the fence
    pin_accumulators(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      wgmma_m64nNk16_rs<T, D>(o, pf[kk], wgmma_desc_mn(v_base + kk * 2048, kBlockN * 128));
    wgmma_commit();
    pin_accumulators(o);
    pin_fragments(pf);
  }
  wgmma_wait<0>();  // the last tile's P.V
  pin_accumulators(o);
  pin_fragments(pf);
  cp_async_wait<0>();  // the last (empty) group, or Q's when there was no key tile
  __syncthreads();     // every warpgroup is done with the K stages: they stage the output

  // Epilogue: normalise, stage the warp's 16 rows (row stride D + 8) in the K
  // stages, then 16-byte coalesced stores; lse = (max + log2(sum)) * ln 2.
  constexpr int LD = D + 8;
  T* const staged = reinterpret_cast<T*>(smem_raw + (sK - shared_addr(smem_raw))) + wrow * LD;
  float inv[2], lse[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = row_sum[rr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    finish_row(l, row_max[rr], inv[rr], lse[rr]);
  }
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    const int col = dt * 8 + (lane % 4) * 2;
    *reinterpret_cast<uint32_t*>(staged + (lane / 4) * LD + col) =
        pack2<T>(o[0][dt][0] * inv[0], o[0][dt][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(staged + (lane / 4 + 8) * LD + col) =
        pack2<T>(o[0][dt][2] * inv[1], o[0][dt][3] * inv[1]);
  }
  if (lane % 4 == 0) {
    float* lse_out = static_cast<float*>(p.lse);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr)
      if (qrow(rr) < r.q_len) lse_out[lse_offset(p, b, h, r, qrow(rr))] = lse[rr];
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + ((r.q_start + m0 + wrow) * p.Hq + h) * D;
  constexpr int kChunks = D / 8;
  for (int c = lane; c < 16 * kChunks; c += kWarpSize) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    if (m0 + wrow + row < r.q_len)
      *reinterpret_cast<uint4*>(out + row * q_stride + col) =
          *reinterpret_cast<const uint4*>(staged + row * LD + col);
  }
#else
  __trap();  // never launched: the launcher checks the kernel was built for sm_90a
#endif
}

// False (nothing launched) where the kernel cannot run on this device / build.
template <typename T, int D>
bool launch(const AttnParams& p, cudaStream_t stream, cudaError_t& err) {
  static std::atomic<uint64_t> checked{0}, usable{0};
  constexpr int smem = smem_bytes<D>();
  if (!wgmma_usable(fwd_kernel<T, D>, smem, p.built_sm90a, checked, usable, err)) return false;
  if (err != cudaSuccess) return true;
  fwd_kernel<T, D><<<query_tile_grid(p, kBlockM), kThreads, smem, stream>>>(p, softmax_scale_log2(p));
  err = cudaGetLastError();
  return true;
}

template <typename T>
bool launch_any(const AttnParams& p, cudaStream_t stream, cudaError_t& err) {
  return with_head_dim_64_128(p.D, false,
                              [&](auto d) { return launch<T, decltype(d)::value>(p, stream, err); });
}

}  // namespace dsk::attention::fwd_v3
