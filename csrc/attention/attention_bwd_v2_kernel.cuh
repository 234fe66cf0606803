// FlashAttention-2 backward, generation 2 (sm_80+), for D = 64 and 128; opt-in
// at run time (attention_api.cpp: DSK_ATTENTION_BWD_KERNEL /
// _attention_cuda_bwd_kernel); every other case runs v1 (attention_bwd_kernel.cuh).
// Same math, masking and rounding points as v1; what changes:
//
// - One pass over the scores instead of two. v1 recomputes S and dP in a
//   separate dq kernel (7 tile products per query tile x key tile); here the
//   dK/dV kernel, once it has dS^T for its keys, stages dS (rounded to T, the
//   value its dK product used) in shared memory and adds dS.K for the query
//   tile into an fp32 buffer, dq_accum, with red.global.add: 5 products.
// - Still deterministic. The key-tile CTAs adding into the same query tile take
//   turns, through one counter per (sample, head, query tile). The key tiles
//   that see query tile qt are 0..j_last(qt) (causal masks keep it a prefix;
//   varlen's surplus key tiles see nothing); they add from j_last down to 0:
//   key tile j waits until the counter reads j_last - j, adds, then bumps it. So
//   every dq element is ((0 + c_jlast) + ...) + c_0: the same bits every run
//   (not v1's bits: v1 sums each query row's keys in one accumulator). Highest
//   key tile first puts the tile at the causal diagonal first, so no CTA waits
//   for its predecessor to walk down the diagonal. CTAs take their key tile
//   from a ticket counter, highest tile first, so a CTA's predecessor (tile
//   j + 1) has always started: no deadlock, whatever order the hardware
//   schedules CTAs in.
//   AttnParams::dq_in_turns false (DSK_ATTENTION_BWD_UNORDERED=1) skips the
//   turns: the adds land in any order, as FlashAttention-2's atomics (a knob
//   to measure what the turns cost; the bits then change from run to run).
// - 128 keys per CTA (8 warps of 16 keys, as v1's warps) so that the dq_accum
//   traffic per FLOP is half what 64-key CTAs would make.
// - A last elementwise kernel writes dq = T(dq_accum * softmax_scale) (launch_dq_convert).
// The delta kernel (rowsum(dout * out)) is v1's.
#pragma once

#include <cuda_runtime.h>

#include "attention/attention_bwd_kernel.cuh"

namespace dsk::attention::bwd_v2 {

constexpr int kBlockN = 128;                  // keys per CTA
constexpr int kBlockM = 64;                   // queries per step (v1's kBlockM: delta is v1's)
constexpr int kWarps = kBlockN / 16;          // 16 keys per warp
constexpr int kThreads = kWarps * kWarpSize;  // 256
constexpr int kLdS = kBlockM + 8;             // dS^T rows: 144 bytes, ldmatrix conflict-free
static_assert(kBlockM == dsk::attention::kBlockM, "the delta kernel's tiles");

// K, V [kBlockN][D + 8]; Q, dO [2 stages][kBlockM][D + 8]; dS^T [kBlockN][kLdS];
// lse2, delta [2 stages][kBlockM] fp32.
template <typename T, int D>
constexpr size_t smem_bytes() {
  return static_cast<size_t>(2 * kBlockN + 4 * kBlockM) * (D + 8) * sizeof(T) +
         static_cast<size_t>(kBlockN) * kLdS * sizeof(T) + 4 * kBlockM * sizeof(float);
}

// Counter slots: [0] is the ticket counter, then one per (sample, query head, query tile).
inline int64_t semaphore_count(const AttnParams& p) {
  return 1 + p.B * p.Hq * ((p.seqlen_q + kBlockM - 1) / kBlockM);
}

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) dkdv_dq_kernel(const AttnParams p, float scale_log2) {
  constexpr int BM = kBlockM, BN = kBlockN, LD = D + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BN][LD]
  T* sV = sK + BN * LD;                     // [BN][LD]
  T* sQ = sV + BN * LD;                     // [2][BM][LD]
  T* sdO = sQ + 2 * BM * LD;                // [2][BM][LD]
  T* sdS = sdO + 2 * BM * LD;               // [BN][kLdS]: dS^T, keys x queries
  float* sLse = reinterpret_cast<float*>(sdS + BN * kLdS);  // [2][BM]
  float* sDelta = sLse + 2 * BM;                              // [2][BM]
  __shared__ int s_ticket;

  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  int* const ticket_counter = p.dq_semaphores;
  if (tid == 0) s_ticket = atomicAdd(ticket_counter, 1);
  __syncthreads();
  // Ticket -> (key tile, kv head, sample), key tile fastest and from the last
  // tile down: a CTA's predecessor in the dq turns (key tile jt + 1) has a
  // smaller ticket, so it has started.
  const int64_t key_tiles = (p.seqlen_k + BN - 1) / BN;
  const int64_t ticket = s_ticket;
  const int64_t jt = key_tiles - 1 - ticket % key_tiles, hk = (ticket / key_tiles) % p.Hkv,
                b = ticket / (key_tiles * p.Hkv);
  const SeqRange r = seq_range(p, b);
  const int64_t n0 = jt * BN;
  if (n0 >= r.k_len) return;  // varlen: past this sample's keys; no turn waits for it
  const int64_t group = p.Hq / p.Hkv;
  const int64_t q_stride = p.Hq * D, k_stride = p.Hkv * D;
  const int64_t keys = r.k_len - n0 < BN ? r.k_len - n0 : BN;
  const int64_t shift = r.k_len - r.q_len;
  const int64_t koff = ((r.k_start + n0) * p.Hkv + hk) * D;
  const bool* pad = p.key_padding_mask ? p.key_padding_mask + b * p.seqlen_k : nullptr;
  int* const sems = p.dq_semaphores + 1;
  const int64_t q_tiles_max = (p.seqlen_q + BM - 1) / BM;
  // This sample's last key tile that has a CTA: a sample longer than
  // max_seqlen_k (not checked on CUDA) gets no CTA past key_tiles, and the
  // turns must not wait for one.
  const int64_t sample_tiles = (r.k_len + BN - 1) / BN;
  const int64_t last_key_tile = (sample_tiles < key_tiles ? sample_tiles : key_tiles) - 1;

  load_tile_async<T, D, LD, kThreads>(sK, static_cast<const T*>(p.k) + koff, k_stride, BN, keys, tid);
  load_tile_async<T, D, LD, kThreads>(sV, static_cast<const T*>(p.v) + koff, k_stride, BN, keys, tid);
  cp_async_commit();

  const KeyTileSteps steps = key_tile_steps(p, r, n0, BM, group);
  const int64_t qt_begin = steps.qt_begin, per_head = steps.per_head, n_iter = steps.n_iter;

  auto load_q = [&](int64_t it, int st) {
    load_q_step<T, D, LD, kThreads>(p, b, hk * group + it / per_head, r,
                                    (qt_begin + it % per_head) * BM, sQ + st * BM * LD,
                                    sdO + st * BM * LD, sLse + st * BM, sDelta + st * BM, tid);
  };
  if (n_iter > 0) load_q(0, 0);
  cp_async_commit();

  float acc_v[D / 8][4], acc_k[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    acc_v[i][0] = acc_v[i][1] = acc_v[i][2] = acc_v[i][3] = 0.f;
    acc_k[i][0] = acc_k[i][1] = acc_k[i][2] = acc_k[i][3] = 0.f;
  }
  // This thread's two keys (relative to the sample).
  const int64_t kj0 = n0 + warp * 16 + lane / 4, kj1 = kj0 + 8;
  const bool key_ok0 = kj0 < r.k_len && !(pad && pad[kj0]);
  const bool key_ok1 = kj1 < r.k_len && !(pad && pad[kj1]);
  // dq part: this warp's 16 query rows of the tile x half of D.
  constexpr int kDqCols = D / 2, kDqChunk = 32;
  const int dq_row = (warp % 4) * 16, dq_col = (warp / 4) * kDqCols;

  for (int64_t it = 0; it < n_iter; ++it) {
    const int st = static_cast<int>(it & 1);
    if (it + 1 < n_iter) load_q(it + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* tQ = sQ + st * BM * LD;
    const T* tdO = sdO + st * BM * LD;
    const float* tLse = sLse + st * BM;
    const float* tDelta = sDelta + st * BM;
    const int64_t h = hk * group + it / per_head, qt = qt_begin + it % per_head, i0 = qt * BM;

    // P^T for this warp's 16 keys x BM queries (masked entries 0), then dV, dS^T, dK (as v1).
    float pt[BM / 8][4];
    tile_scores<T, D, BM, LD>(pt, sK, warp * 16, tQ, lane);
    probs_t(pt, p, kj0, key_ok0, key_ok1, i0, shift, scale_log2, tLse, lane);
    tile_accumulate<T, D, BM, LD>(acc_v, pt, tdO, lane);
    float dst[BM / 8][4];
    tile_scores<T, D, BM, LD>(dst, sV, warp * 16, tdO, lane);
    dscores_t(dst, pt, tDelta, lane);
    tile_accumulate<T, D, BM, LD>(acc_k, dst, tQ, lane);

    // dS^T of the warp's keys into sdS, rounded to T as the dK product used it.
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
      const int col = nt * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + lane / 4) * kLdS + col) =
          pack2<T>(dst[nt][0], dst[nt][1]);
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + lane / 4 + 8) * kLdS + col) =
          pack2<T>(dst[nt][2], dst[nt][3]);
    }
    __syncthreads();

    // A sample longer than max_seqlen_q (not checked on CUDA) has no counters
    // past q_tiles_max: as in v1, whose dq grid ends there, those rows get no dq.
    if (qt >= q_tiles_max) {
      __syncthreads();
      continue;
    }
    // dq_accum[tile rows] += dS . K over this CTA's keys, in 32-column chunks;
    // the first chunk is computed before waiting for this tile's turn. The key
    // tiles that see query tile qt are 0..j_last, j_last holding the last key its
    // last row sees (this CTA's keys are among them: key_limit >= 1 here): this
    // tile's turn is j_last - jt.
    int64_t j_last = (key_limit(p, r, (qt + 1) * BM - 1) - 1) / BN;
    j_last = j_last < last_key_tile ? j_last : last_key_tile;
    const int turn = static_cast<int>(j_last - jt);
    int* const sem = sems + (b * p.Hq + h) * q_tiles_max + qt;
    // This thread's rows qi and qi + 8 of the tile; row i of the sample's head h
    // is dq_head + i * Hq * D.
    const int64_t qi = i0 + dq_row + lane / 4;
    float* const dq_head = p.dq_accum + (r.q_start * p.Hq + h) * D;
#pragma unroll
    for (int c = 0; c < kDqCols / kDqChunk; ++c) {
      float part[kDqChunk / 8][4];
#pragma unroll
      for (int i = 0; i < kDqChunk / 8; ++i) part[i][0] = part[i][1] = part[i][2] = part[i][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < BN / 16; ++ks) {
        uint32_t a[4];
        load_a_frag_trans<T, kLdS>(a, sdS, dq_row, ks * 16, lane);
#pragma unroll
        for (int n2 = 0; n2 < kDqChunk / 16; ++n2) {
          uint32_t bf[4];
          load_b_frags_kn<T, LD>(bf, sK, ks * 16, dq_col + c * kDqChunk + n2 * 16, lane);
          mma16816<T>(part[2 * n2], a, bf[0], bf[1]);
          mma16816<T>(part[2 * n2 + 1], a, bf[2], bf[3]);
        }
      }
      if (c == 0 && p.dq_in_turns) {
        if (tid == 0) {
          while (load_acquire(sem) != turn) {
          }
        }
        __syncthreads();
      }
#pragma unroll
      for (int nt = 0; nt < kDqChunk / 8; ++nt) {
        const int col = dq_col + c * kDqChunk + nt * 8 + (lane % 4) * 2;
        if (qi < r.q_len) {
          float* const dq = dq_head + qi * q_stride + col;
          atomicAdd(dq, part[nt][0]);
          atomicAdd(dq + 1, part[nt][1]);
        }
        if (qi + 8 < r.q_len) {
          float* const dq = dq_head + (qi + 8) * q_stride + col;
          atomicAdd(dq, part[nt][2]);
          atomicAdd(dq + 1, part[nt][3]);
        }
      }
    }
    // The barrier orders every thread's adds before thread 0's fence and
    // release (cooperative groups' grid sync: bar.sync, fence, release), which
    // hands the tile to key tile jt - 1.
    __syncthreads();
    if (tid == 0 && p.dq_in_turns) {
      __threadfence();
      store_release(sem, turn + 1);
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  const int64_t valid = keys - warp * 16;
  T* dk = static_cast<T*>(p.dk) + koff + warp * 16 * k_stride;
  T* dv = static_cast<T*>(p.dv) + koff + warp * 16 * k_stride;
  store_rows<T, D, LD>(acc_v, 1.f, sV + warp * 16 * LD, dv, k_stride, valid, lane);
  store_rows<T, D, LD>(acc_k, static_cast<float>(p.softmax_scale), sK + warp * 16 * LD, dk,
                       k_stride, valid, lane);
}

// p.dq_accum (zeroed, like dq) and p.dq_semaphores (zeroed, semaphore_count(p)
// slots) come from the host glue.
template <typename T, int D>
int launch(const AttnParams& p, cudaStream_t stream) {
  if (p.seqlen_q > 0) {
    attention_delta_kernel<T, D><<<query_tile_grid(p, kBlockM), dsk::attention::kThreads, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.seqlen_k > 0) {
    constexpr size_t smem = smem_bytes<T, D>();
    cudaError_t err = allow_smem(dkdv_dq_kernel<T, D>, smem);
    if (err != cudaSuccess) return err;
    const int64_t ctas = (p.seqlen_k + kBlockN - 1) / kBlockN * p.Hkv * p.B;
    dkdv_dq_kernel<T, D><<<static_cast<unsigned>(ctas), kThreads, smem, stream>>>(p, softmax_scale_log2(p));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return launch_dq_convert<T>(p, stream);
}

template <typename T>
int launch_any(const AttnParams& p, cudaStream_t stream) {
  return with_head_dim_64_128(p.D, static_cast<int>(cudaErrorInvalidValue),
                              [&](auto d) { return launch<T, decltype(d)::value>(p, stream); });
}

}  // namespace dsk::attention::bwd_v2
