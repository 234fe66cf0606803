// FlashAttention backward, generation 3: Hopper tensor cores (wgmma, sm_90a)
// for D = 64 and 128; opt-in (DSK_ATTENTION_BWD_KERNEL=v3 /
// _attention_cuda_bwd_kernel(3)); where it cannot run (no sm_90a build or GPU,
// other dtype or D) the glue picks v2, then v1. Same math, masking and rounding
// points as v1/v2 (attention_bwd_kernel.cuh: P and dS rounded to T for their
// products, fp32 accumulation, probabilities from the saved lse).
//
// - A CTA (two warpgroups, 256 threads) owns key tiles of 128 keys of one kv
//   head, 64 keys per warpgroup, and walks the query tiles of the GQA group
//   that see them (BM = 64 queries per step for D = 128, 128 for D = 64):
//     S^T  = K.Q^T    wgmma m64nBMk16, K and Q from shared memory (K-major)
//     dP^T = V.dO^T   the same with V and dO
//     P^T, dS^T       in the accumulators' registers (probs_t, dscores_t: v1's)
//     dV  += P^T.dO   wgmma m64nDk16, P^T from registers, dO MN-major
//     dK  += dS^T.Q   the same with dS^T and Q
//     dQ   = dS.K     dS^T staged in shared memory (keys as rows, as T), both
//                     operands MN-major; each warpgroup one 64 x 64 block of the
//                     BM x D tile, over all 128 keys
//   then the dQ block is added into p.dq_accum with fp32 atomics, or with
//   p.dq_bulk through shared memory by the TMA unit's bulk reductions, one
//   warpgroup's 64 x 64 block a row at a time (opt-in; the same adds in the same
//   order: the same bits, but for subnormals: the atomics, red.add.f32, flush
//   them to zero, the bulk reductions keep them).
// - Deterministic without turns: the key tiles of a (sample, kv head) are dealt
//   to p.dq_splits CTAs (tile jt to CTA jt % splits, each walking its tiles in
//   order), and CTA s adds only into accumulator s. So every dq_accum element
//   has one writer thread, whose adds land in program order: the same bits every
//   run. The convert kernel sums the accumulators in split order
//   (launch_dq_convert). dq_splits depends on the GPU's SM count only
//   (attention_bwd_v3_splits): bits are reproducible on one GPU model.
// - Q, dO, lse and delta of the next step load (cp.async) while the current one
//   computes; one barrier publishes a stage, one more publishes dS^T.
// - dK, dV leave through 16-byte stores staged in the free Q/dO stages.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "attention/attention_bwd_kernel.cuh"
#include "common/sm90.cuh"

namespace dsk::attention::bwd_v3 {

constexpr int kBlockN = 128;  // keys per tile: two warpgroups of 64
constexpr int kThreads = 256;
// Queries per step: 64 for D = 128 (dQ's two 64 x 64 blocks split D), 128 for
// D = 64 (they split the queries).
template <int D> constexpr int block_m() { return D == 64 ? 128 : 64; }
// A [rows][D] tile of 16-bit elements in D / 64 swizzled column blocks of rows x 128 bytes.
template <int D> constexpr int tile_bytes(int rows) { return rows * D * 2; }
// A warpgroup's staged 64 x 64 fp32 dQ block (p.dq_bulk): rows padded from 256 to
// 288 bytes, so a warp's fragment stores (8 rows x 32 bytes) meet two-way bank
// conflicts at most; 16-byte aligned rows for the bulk copies.
constexpr int kDqRowBytes = 64 * 4 + 32;
constexpr int kDqBlockBytes = 64 * kDqRowBytes;
// K, V; Q and dO in two stages; dS^T [kBlockN keys][BM queries] (BM / 64 column
// blocks); lse2 and delta [2 stages][BM]; the two warpgroups' dQ blocks (from a
// 128-byte boundary); + 1 KiB to align the base.
template <int D> constexpr int stats_end() {
  return 2 * tile_bytes<D>(kBlockN) + 4 * tile_bytes<D>(block_m<D>()) + kBlockN * block_m<D>() * 2 +
         4 * block_m<D>() * 4;
}
template <int D, bool kDqBulk = false> constexpr int smem_bytes() {
  return stats_end<D>() + (kDqBulk ? 128 + 2 * kDqBlockBytes : 0) + 1024;
}
static_assert(tile_bytes<64>(64) % 1024 == 0 && smem_bytes<128, true>() <= 227 * 1024 &&
                  smem_bytes<64, true>() <= 227 * 1024,
              "bwd v3 tiles must sit on 1 KiB swizzle atoms and fit an sm_90 CTA");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// ROWS rows of `src` (row stride in elements), valid_rows of them real, into the
// swizzled column blocks at `dst`.
template <int ROWS, int D>
__device__ __forceinline__ void load_tile(uint32_t dst, const void* src, int64_t stride,
                                          int64_t valid_rows) {
#pragma unroll
  for (int cb = 0; cb < D / 64; ++cb)
    load_swizzled_rows<ROWS, kThreads>(dst + cb * ROWS * 128, src, 0, valid_rows, cb * 128, D * 2,
                                       stride * 2);
}

// S[64 x BM] = A.B^T over D, one committed wgmma group (after the caller's
// fence): A 64 rows of a [kBlockN][D] tile from `a_rows` on, B the [BM][D] tile at
// b_tile, both K-major in their D / 64 swizzled column blocks.
template <typename T, int D, int BM>
__device__ __forceinline__ void issue_scores(float (&d)[1][BM / 8][4], uint32_t a_rows,
                                             uint32_t b_tile) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint64_t desc_a = wgmma_desc(a_rows + (ks / 4) * kBlockN * 128 + (ks % 4) * 32);
    const uint64_t desc_b = wgmma_desc(b_tile + (ks / 4) * BM * 128 + (ks % 4) * 32);
    if constexpr (BM == 64) {
      wgmma_m64n64k16_ss<T, false, false>(d, desc_a, desc_b, ks > 0);
    } else {
      wgmma_m64n128k16_ss<T>(d, desc_a, desc_b, ks > 0);
    }
  }
  wgmma_commit();
}

// acc[64 x D] += A.B, one committed wgmma group: A = the [64 x BM] scores `c`
// rounded to T into the fragments `a` (which must stay unchanged until a wait
// covers the group), B the MN-major [BM][D] tile at `b_tile` (16 of its rows =
// 2048 bytes; 64-column blocks BM * 128 bytes apart).
template <typename T, int D, int MS>
__device__ __forceinline__ void issue_rs_product(float (&acc)[1][D / 8][4], uint32_t (&a)[MS][4],
                                                 const float (&c)[1][2 * MS][4], uint32_t b_tile) {
#pragma unroll
  for (int kk = 0; kk < MS; ++kk) c_to_a<T>(a[kk], c[0][2 * kk], c[0][2 * kk + 1]);
  pin_fragments(a);
  pin_accumulators(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < MS; ++kk)
    wgmma_m64nNk16_rs<T, D>(acc, a[kk], wgmma_desc_mn(b_tile + kk * 2048, MS * 16 * 128));
  wgmma_commit();
}

__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void st_shared_v2_f32(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y) : "memory");
}

// kDqBulk: warpgroup wg's dQ staging block (after the statistics, from a 128-byte
// boundary), recomputed where used rather than kept live.
template <int D>
__device__ __forceinline__ uint32_t dq_staging_block(int wg) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  return ((((shared_addr(smem_raw) + 1023u) & ~1023u) + stats_end<D>() + 127u) & ~127u) + wg * kDqBlockBytes;
}

// kDqBulk: a staged 64 x 64 dQ block added into the accumulator rows from `dq_row0`
// on (the first of them `row0` of the sample's q_len rows; columns from dq_head's),
// a row (256 bytes) per bulk reduction, by one warp's lanes; one bulk group each.
__device__ __forceinline__ void add_dq_block_bulk(float* dq_head, int64_t row0, int64_t q_len, int64_t q_stride,
                                                  uint32_t staging, int lane) {
  for (int rr = lane; rr < 64; rr += 32) {
    if (row0 + rr < q_len) bulk_reduce_add_f32(dq_head + (row0 + rr) * q_stride, staging + rr * kDqRowBytes, 64 * 4);
  }
  bulk_commit();
}

// kDqBulk: p.dq_bulk's instance (its own kernel, so the default keeps its registers).
template <typename T, int D, bool kDqBulk>
__device__ __forceinline__ void dkdv_dq_body(const AttnParams& p, float scale_log2) {
  constexpr int BM = block_m<D>(), BN = kBlockN, MS = BM / 16, NT = BM / 8, DT = D / 8;
  constexpr int kKV = tile_bytes<D>(BN), kQ = tile_bytes<D>(BM);
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t raw = shared_addr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t sK = base, sV = sK + kKV, sQ = sV + kKV, sdO = sQ + 2 * kQ, sdS = sdO + 2 * kQ;
  float* const sLse = reinterpret_cast<float*>(smem_raw + (sdS + BN * BM * 2 - raw));  // [2][BM]
  float* const sDelta = sLse + 2 * BM;                                                 // [2][BM]

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int64_t split = blockIdx.x, splits = p.dq_splits, hk = blockIdx.y, b = blockIdx.z;
  const SeqRange r = seq_range(p, b);
  const int64_t group = p.Hq / p.Hkv;
  const int64_t q_stride = p.Hq * D, k_stride = p.Hkv * D;
  const int64_t shift = r.k_len - r.q_len;
  const bool* pad = p.key_padding_mask ? p.key_padding_mask + b * p.seqlen_k : nullptr;
  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const int64_t q_rows = p.cu_seqlens_q ? p.total_q : p.B * p.seqlen_q;
  float* const dq_acc = p.dq_accum + split * q_rows * p.Hq * D;  // this CTA's accumulator
  const int64_t key_tiles = (r.k_len + BN - 1) / BN;
  // This thread's first key row in the tile, its rows of the dQ block and its
  // columns (mma.sync's C layout per warp: rows lane / 4 and + 8).
  const int key_row = wg * 64 + warp * 16 + lane / 4;
  const int dq_m = D == 64 ? wg * 64 : 0, dq_n = D == 64 ? 0 : wg * 64;

  float acc_v[1][DT][4], acc_k[1][DT][4];

  for (int64_t jt = split; jt < key_tiles; jt += splits) {
    const int64_t n0 = jt * BN;
    const int64_t keys = r.k_len - n0 < BN ? r.k_len - n0 : BN;
    const int64_t koff = ((r.k_start + n0) * p.Hkv + hk) * D;
    const KeyTileSteps steps = key_tile_steps(p, r, n0, BM, group);
    const int64_t qt_begin = steps.qt_begin, per_head = steps.per_head, n_iter = steps.n_iter;
    // Step it's query rows: head and first row; its Q and dO tiles into stage st
    // (cp.async); its rows' lse and delta (thread tid < BM: row tid; raw lse,
    // +inf past the rows) into registers, stored to the stage by store_stats.
    auto step_rows = [&](int64_t it, int64_t& h, int64_t& i0) {
      h = hk * group + it / per_head;
      i0 = (qt_begin + it % per_head) * BM;
    };
    auto load_q = [&](int64_t it, int st) {
      int64_t h, i0;
      step_rows(it, h, i0);
      const int64_t off = ((r.q_start + i0) * p.Hq + h) * D;
      load_tile<BM, D>(sQ + st * kQ, q + off, q_stride, r.q_len - i0);
      load_tile<BM, D>(sdO + st * kQ, dout + off, q_stride, r.q_len - i0);
    };
    auto load_stats = [&](int64_t it, float& lse, float& delta) {
      int64_t h, i0;
      step_rows(it, h, i0);
      lse = INFINITY;
      delta = 0.f;
      if (tid < BM && i0 + tid < r.q_len) {
        const int64_t o = lse_offset(p, b, h, r, i0 + tid);
        lse = static_cast<const float*>(p.lse)[o];
        delta = p.delta[o];
      }
    };
    auto store_stats = [&](int st, float lse, float delta) {
      if (tid < BM) {
        sLse[st * BM + tid] = lse2_from(lse);
        sDelta[st * BM + tid] = delta;
      }
    };

    __syncthreads();  // the previous key tile's reads of K, V, the stages and the staged rows are done
    load_tile<BN, D>(sK, static_cast<const T*>(p.k) + koff, k_stride, keys);
    load_tile<BN, D>(sV, static_cast<const T*>(p.v) + koff, k_stride, keys);
    if (n_iter > 0) {
      load_q(0, 0);
      float lse, delta;
      load_stats(0, lse, delta);
      store_stats(0, lse, delta);
    }
    cp_async_commit();

#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_v[0][i][e] = acc_k[0][i][e] = 0.f;
    const int64_t kj0 = n0 + key_row, kj1 = kj0 + 8;
    const bool key_ok0 = kj0 < r.k_len && !(pad && pad[kj0]);
    const bool key_ok1 = kj1 < r.k_len && !(pad && pad[kj1]);

    // kDqBulk: where the staged dQ block goes (its rows' accumulator columns and
    // first row), for its bulk reductions a step later.
    float* staged_head = nullptr;
    int64_t staged_row0 = 0;
    for (int64_t it = 0; it < n_iter; ++it) {
      const int st = static_cast<int>(it & 1);
      // Step it's tiles landed for every thread; the fence hands each thread's
      // copies to the async proxy, the barrier everyone's. Every wgmma of step
      // it - 1 was waited for before it: stage st ^ 1 and dS^T are free.
      cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();
      if constexpr (kDqBulk) {
        // Step it - 1's dQ block, staged and fenced before the barrier, added a step
        // late: cp.async and bulk groups share a wait counter, so the wait for the
        // next step's copies then finds these long done instead of waiting for them.
        if (it > 0 && warp == 0)
          add_dq_block_bulk(staged_head, staged_row0, r.q_len, q_stride, dq_staging_block<D>(wg), lane);
      }
      // Step it + 1's rows into stage st ^ 1 (read by step it - 1, done for every
      // thread past the barrier); its statistics are stored once this step's
      // score wgmma are issued, so their load latency hides behind them.
      float lse_next = INFINITY, delta_next = 0.f;
      if (it + 1 < n_iter) {
        load_q(it + 1, st ^ 1);
        load_stats(it + 1, lse_next, delta_next);
      }
      cp_async_commit();
      int64_t h, i0;
      step_rows(it, h, i0);
      const uint32_t q_t = sQ + st * kQ, do_t = sdO + st * kQ;

      // S^T and dP^T: this warpgroup's 64 keys x BM queries, D / 16 steps each.
      // (Zeroed here though the first step overwrites them: the asm reads its
      // accumulators, and values from the last step would stay live across it.)
      float s[1][NT][4], dp[1][NT][4];
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[0][i][e] = dp[0][i][e] = 0.f;
      wgmma_fence();
      issue_scores<T, D, BM>(s, sK + wg * 64 * 128, q_t);
      issue_scores<T, D, BM>(dp, sV + wg * 64 * 128, do_t);
      if (it + 1 < n_iter) store_stats(st ^ 1, lse_next, delta_next);
      wgmma_wait<1>();  // S^T landed; dP^T may still run
      pin_accumulators(s);

      // P^T, then dV += P^T.dO (dO as the MN-major B operand: 16 queries = 2048 bytes).
      probs_t(s[0], p, kj0, key_ok0, key_ok1, i0, shift, scale_log2, sLse + st * BM, lane);
      uint32_t pf[MS][4];
      issue_rs_product<T, D>(acc_v, pf, s, do_t);
      // dP^T and dV done (the other warpgroup keeps the tensor cores busy): P's
      // fragments die here, which keeps the kernel within 255 registers.
      wgmma_wait<0>();
      pin_accumulators(dp);
      pin_accumulators(acc_v);
      pin_fragments(pf);

      // dS^T, then dK += dS^T.Q, and dS^T (as T, the values dK uses) into shared memory.
      dscores_t(dp[0], s[0], sDelta + st * BM, lane);
      uint32_t df[MS][4];
      issue_rs_product<T, D>(acc_k, df, dp, q_t);
      // df[kk][2c + rr] holds keys key_row + 8 rr, queries kk * 16 + 8 c + (lane % 4) * 2
      // and + 1: one 4-byte word at their swizzled place (keys as rows, 64 queries
      // = 128 bytes per row and column block): 16-byte chunk 2 (kk % 4) + c of the
      // row, XOR the row's swizzle (key_row % 8, the same for both rows).
      const uint32_t ds_row = sdS + key_row * 128 + (lane % 4) * 4;
      const int swz = key_row & 7;
#pragma unroll
      for (int kk = 0; kk < MS; ++kk)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const uint32_t addr = ds_row + (kk / 4) * BN * 128 + (((2 * (kk % 4) + c) ^ swz) << 4);
          st_shared_b32(addr, df[kk][2 * c]);
          st_shared_b32(addr + 8 * 128, df[kk][2 * c + 1]);
        }
      fence_proxy_async();  // dS^T, written through the generic proxy, for wgmma
      __syncthreads();      // both warpgroups' keys are in dS^T

      // dQ block (queries dq_m.., columns dq_n..) = dS.K over the 128 keys: dS^T
      // as the MN-major A operand (queries contiguous), K as the MN-major B
      // operand (D contiguous); 16 keys = 2048 bytes in both.
      float dq[1][8][4];
#pragma unroll
      for (int i = 0; i < 8; ++i) dq[0][i][0] = dq[0][i][1] = dq[0][i][2] = dq[0][i][3] = 0.f;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        wgmma_m64n64k16_ss<T, true, true>(
            dq, wgmma_desc_mn(sdS + (dq_m / 64) * BN * 128 + kk * 2048, BN * 128),
            wgmma_desc_mn(sK + (dq_n / 64) * BN * 128 + kk * 2048, BN * 128), kk > 0);
      wgmma_commit();
      wgmma_wait<0>();  // dK and dQ: the stage, dS^T and dS^T's fragments are free
      pin_accumulators(dq);
      pin_accumulators(acc_k);
      pin_fragments(df);

      // dq_accum[rows] += the dQ block: this thread (kDqBulk: its warpgroup's
      // warp 0) is the only writer of its elements in this accumulator, so the
      // adds land in program order (bulk ones: see the key tile's end).
      float* const dq_head = dq_acc + (r.q_start * p.Hq + h) * D;
      const int64_t qi = i0 + dq_m + warp * 16 + lane / 4;
      if constexpr (kDqBulk) {
        // Into the staging rows once the last block's bulk reductions (issued at
        // this step's top) have read them; added at the next step's top.
        if (warp == 0) bulk_wait_read();
        named_barrier_sync(1 + wg, 128);
        const uint32_t row0 = dq_staging_block<D>(wg) + (warp * 16 + lane / 4) * kDqRowBytes + (lane % 4) * 8;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          st_shared_v2_f32(row0 + nt * 32, dq[0][nt][0], dq[0][nt][1]);
          st_shared_v2_f32(row0 + 8 * kDqRowBytes + nt * 32, dq[0][nt][2], dq[0][nt][3]);
        }
        fence_proxy_async();  // for the bulk reductions' reads
        staged_head = dq_head + dq_n;
        staged_row0 = i0 + dq_m;
      } else {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int col = dq_n + nt * 8 + (lane % 4) * 2;
          if (qi < r.q_len)
            atomicAdd(reinterpret_cast<float2*>(dq_head + qi * q_stride + col),
                      make_float2(dq[0][nt][0], dq[0][nt][1]));
          if (qi + 8 < r.q_len)
            atomicAdd(reinterpret_cast<float2*>(dq_head + (qi + 8) * q_stride + col),
                      make_float2(dq[0][nt][2], dq[0][nt][3]));
        }
      }
    }
    if constexpr (kDqBulk) {
      named_barrier_sync(1 + wg, 128);  // the warpgroup's last block is staged
      if (n_iter > 0 && warp == 0)
        add_dq_block_bulk(staged_head, staged_row0, r.q_len, q_stride, dq_staging_block<D>(wg), lane);
      // This key tile's bulk reductions performed before the next key tile's,
      // which add into the same rows: the async proxy keeps no order between them.
      if (warp == 0) bulk_wait();
    }
    cp_async_wait<0>();  // the last (empty) group, or K/V's when no query sees the tile
    __syncthreads();     // no warpgroup reads the Q/dO stages any more: they stage dK, dV

    // dV and dK rows of this warp (row stride D + 8 elements, in the Q stages).
    constexpr int LD = D + 8;
    static_assert(kBlockN * LD * 2 <= 4 * tile_bytes<D>(block_m<D>()), "staging fits the stages");
    T* const staged = reinterpret_cast<T*>(smem_raw + (sQ - raw)) + (wg * 64 + warp * 16) * LD;
    const int64_t valid = keys - (wg * 64 + warp * 16);
    const int64_t row_off = koff + (wg * 64 + warp * 16) * k_stride;
    store_rows<T, D, LD>(acc_v[0], 1.f, staged, static_cast<T*>(p.dv) + row_off, k_stride, valid, lane);
    __syncwarp();  // the warp's rows are read out before dK overwrites them
    store_rows<T, D, LD>(acc_k[0], static_cast<float>(p.softmax_scale), staged,
                         static_cast<T*>(p.dk) + row_off, k_stride, valid, lane);
  }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <typename T, int D, bool kDqBulk>
__global__ void __launch_bounds__(kThreads, 1) dkdv_dq_kernel(const AttnParams p, float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  dkdv_dq_body<T, D, kDqBulk>(p, scale_log2);
#else
  __trap();  // never launched: attention_bwd_v3_splits checks the kernel was built for sm_90a
#endif
}

// How many dq accumulators (CTAs per kv head and sample). A CTA of split count s
// walks ceil(key_tiles / s) key tiles and the B * Hkv * s CTAs run in
// ceil(B * Hkv * s / SMs) waves (one CTA per SM), so the time goes as their
// product. Start from the s that fills the GPU once, ceil(SMs / (B * Hkv)), and
// take another s in 1..16 (at most one per key tile) only where that product is
// smaller: on a tie the CTAs of one head keep sharing its Q and dO in L2 (on an
// H100, B=8 Hkv=16 Lq=1024 D=128: s=2 3.04 ms, s=1 3.13, its 128 heads' Q and dO
// overflowing L2); e.g. B=4 Hkv=8 Lk=4096 gets 4 (one wave), where 5 leaves a
// second wave of 28 CTAs. At most 4 GiB of accumulators (long sequences over few
// heads: fewer CTAs rather than the memory).
inline int64_t splits_for(const AttnParams& p, int sms) {
  const int64_t key_tiles = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const int64_t heads = p.B * p.Hkv > 0 ? p.B * p.Hkv : 1;
  const int64_t q_rows = p.cu_seqlens_q ? p.total_q : p.B * p.seqlen_q;
  const int64_t accum_bytes = q_rows * p.Hq * p.D * 4;
  const int64_t slots = sms > 0 ? sms : 1;
  int64_t max_splits = key_tiles < 16 ? key_tiles : 16;
  if (accum_bytes > 0 && max_splits > (int64_t{4} << 30) / accum_bytes) max_splits = (int64_t{4} << 30) / accum_bytes;
  if (max_splits < 1) return 1;
  auto cost = [&](int64_t s) { return (heads * s + slots - 1) / slots * ((key_tiles + s - 1) / s); };
  int64_t best = (slots + heads - 1) / heads;
  if (best > max_splits) best = max_splits;
  for (int64_t s = 1; s <= max_splits; ++s)
    if (cost(s) < cost(best)) best = s;
  return best;
}

// Whether the instance can run here (checked once per device).
template <typename T, int D, bool kDqBulk>
bool kernel_usable(const AttnParams& p) {
  static std::atomic<uint64_t> checked{0}, usable{0};
  cudaError_t err = cudaSuccess;
  return wgmma_usable(dkdv_dq_kernel<T, D, kDqBulk>, smem_bytes<D, kDqBulk>(), p.built_sm90a, checked, usable,
                      err) &&
         err == cudaSuccess;
}

// 0 where the kernel p.dq_bulk picks cannot run here (see attention_bwd_v3_splits).
template <typename T, int D>
int64_t usable_splits(const AttnParams& p) {
  if (!(p.dq_bulk ? kernel_usable<T, D, true>(p) : kernel_usable<T, D, false>(p))) return 0;
  return splits_for(p, multiprocessor_count());
}

// p.dq_accum holds p.dq_splits zeroed accumulators (the glue).
template <typename T, int D>
int launch(const AttnParams& p, cudaStream_t stream) {
  if (p.seqlen_q > 0) {
    attention_delta_kernel<T, D>
        <<<query_tile_grid(p, dsk::attention::kBlockM), dsk::attention::kThreads, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.seqlen_k > 0) {
    const dim3 grid(static_cast<unsigned>(p.dq_splits), static_cast<unsigned>(p.Hkv),
                    static_cast<unsigned>(p.B));
    if (p.dq_bulk) {
      dkdv_dq_kernel<T, D, true><<<grid, kThreads, smem_bytes<D, true>(), stream>>>(p, softmax_scale_log2(p));
    } else {
      dkdv_dq_kernel<T, D, false><<<grid, kThreads, smem_bytes<D>(), stream>>>(p, softmax_scale_log2(p));
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return launch_dq_convert<T>(p, stream);
}

template <typename T>
int64_t usable_splits_any(const AttnParams& p) {
  return with_head_dim_64_128(p.D, int64_t{0},
                              [&](auto d) { return usable_splits<T, decltype(d)::value>(p); });
}

template <typename T>
int launch_any(const AttnParams& p, cudaStream_t stream) {
  return with_head_dim_64_128(p.D, static_cast<int>(cudaErrorInvalidValue),
                              [&](auto d) { return launch<T, decltype(d)::value>(p, stream); });
}

}  // namespace dsk::attention::bwd_v3
