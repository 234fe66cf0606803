// CUDA kernels for MoE routing. No torch headers: moe_api.cpp validates the
// tensors and fills the params structs. Determinism: every floating-point sum
// has a fixed order (moe_params.h), and slots come from per-chunk counts and a
// prefix sum over chunks per expert, never from the order of atomics (the only
// atomics are integer counts, exact in any order).
//
// gating, three launches (four with probability dropping):
//   1. rows: one block of 8 warps per chunk of kScoreSumChunk (8) tokens, one
//      warp per token, the row in registers (lane l holds experts l, l + 32, ...):
//      scores (softmax sum as 32 strided lane sums + xor butterfly), group scores
//      and topk_group groups (shared memory), top-k by warp argmax rounds (ties:
//      lower index), weights. Then per chunk: counts per expert (shared integer
//      atomics), each choice's rank inside the chunk (earlier tokens with the
//      same expert) and the per-expert score sums in token order.
//   2. scan: one block per 8 experts: the exclusive prefix of the chunk counts
//      over chunks (the chunk bases), routed/kept counts, mean scores (strided
//      lane sums + halving tree, the order of moe_params.h).
//   3. slots: one thread per choice: rank = chunk base + rank in chunk.
//   4. probability mode only: expert offsets (one block scan), then one block per
//      over-full expert; a choice's weight rank among its expert's choices
//      (ties: earlier token) decides whether it is kept; kept ones are renumbered
//      in token order by a block prefix sum.
// rows (dispatch/combine/permute/unpermute): dispatch/permute is token-major
// (a token's row read once, 16-byte vectors, written to each of its kept rows;
// unfilled rows zeroed by the same launch), combine/unpermute one warp per
// token accumulating its k rows in choice order in fp32.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "moe/moe_math.h"
#include "moe/moe_params.h"

namespace dsk::moe {
namespace {

constexpr int kWarp = 32;

__host__ __device__ inline int64_t align16(int64_t b) { return (b + 15) / 16 * 16; }

struct Workspace {
  int32_t* chunk_counts;  // [nchunks, E] counts, then bases
  float* partial;         // [nchunks, E]
  int32_t* local_rank;    // [T * k]
  // order and offsets are int64: a choice index t * k + j and the routed total
  // reach T * k, past 2^31 from T = 2^31 / k tokens (k <= 16, T < 2^31).
  int64_t* order;         // [T * k] choices by (expert, rank)
  int64_t* offsets;       // [E + 1]
  int32_t* keep;          // [T * k]
};

Workspace carve(void* base, int64_t T, int64_t E, int64_t k) {
  const int64_t nchunks = (T + kScoreSumChunk - 1) / kScoreSumChunk;
  char* p = static_cast<char*>(base);
  Workspace w;
  w.chunk_counts = reinterpret_cast<int32_t*>(p);
  p += align16(nchunks * E * 4);
  w.partial = reinterpret_cast<float*>(p);
  p += align16(nchunks * E * 4);
  w.local_rank = reinterpret_cast<int32_t*>(p);
  p += align16(T * k * 4);
  w.order = reinterpret_cast<int64_t*>(p);
  p += align16(T * k * 8);
  w.offsets = reinterpret_cast<int64_t*>(p);
  p += align16((E + 1) * 8);
  w.keep = reinterpret_cast<int32_t*>(p);
  return w;
}

// A float (not NaN) as a uint32 of the same order; -0 maps like +0 (equal
// floats, equal keys), and 0 lies below every float (-inf included).
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t u = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Warp argmax over (value, index) candidates; ties go to the lower index,
// idx < 0 means "no candidate". Every lane gets the index (-1 if none; the
// value is not needed by the callers). Two redux.sync (sm_80+): the best key,
// then the lowest index holding it, instead of a 5-step shuffle butterfly.
__device__ __forceinline__ void warp_argmax(float v, int& idx) {
  const uint32_t key = idx >= 0 ? order_key(v) : 0u;
  const uint32_t best = __reduce_max_sync(0xffffffffu, key);
  const uint32_t who = __reduce_min_sync(
      0xffffffffu, (idx >= 0 && key == best) ? static_cast<uint32_t>(idx) : 0xffffffffu);
  idx = who == 0xffffffffu ? -1 : static_cast<int>(who);
}

constexpr int kChunkWarps = static_cast<int>(kScoreSumChunk);  // one warp per token of a chunk
constexpr int kChunkThreads = kChunkWarps * kWarp;

// Dynamic shared memory of the rows kernel (one chunk per block at a time).
struct RowsSmem {
  float* p;                // [8][E] scores, for the chunk's score sums
  float* sel;              // [8][E] selection scores, for the group scores
  int32_t* cnt;            // [E] choices per expert in the chunk
  uint16_t* grp_of;        // [E] group of each expert (no integer division per token)
  float* gscore;           // [8][G]
  unsigned char* allowed;  // [8][G]
  int32_t* ids;            // [8][kMaxK] the chunk's choices (-1: not routed)
};

__host__ __device__ inline int64_t rows_smem_bytes(int64_t E, int64_t G) {
  return 2 * align16(kChunkWarps * E * 4) + align16(E * 4) + align16(E * 2) +
         align16(kChunkWarps * G * 4) + align16(kChunkWarps * G) + align16(kChunkWarps * kMaxK * 4);
}

__device__ inline RowsSmem carve_rows_smem(unsigned char* base, int64_t E, int64_t G) {
  RowsSmem s;
  s.p = reinterpret_cast<float*>(base);
  base += align16(kChunkWarps * E * 4);
  s.sel = reinterpret_cast<float*>(base);
  base += align16(kChunkWarps * E * 4);
  s.cnt = reinterpret_cast<int32_t*>(base);
  base += align16(E * 4);
  s.grp_of = reinterpret_cast<uint16_t*>(base);
  base += align16(E * 2);
  s.gscore = reinterpret_cast<float*>(base);
  base += align16(kChunkWarps * G * 4);
  s.allowed = base;
  base += align16(kChunkWarps * G);
  s.ids = reinterpret_cast<int32_t*>(base);
  return s;
}

// NPL = experts per lane (E <= 32 * NPL): the row lives in registers.
template <typename T, int NPL>
__global__ void __launch_bounds__(kChunkThreads) gating_rows_kernel(GatingParams g, Workspace ws,
                                                                    int64_t nchunks) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t E = g.E, G = g.n_group, gsize = E / G, k = g.k;
  const RowsSmem sm = carve_rows_smem(smem_raw, E, G);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const T* logits = static_cast<const T*>(g.logits);
  const float* bias = static_cast<const float*>(g.bias);
  float* weights = static_cast<float*>(g.weights);
  const bool group_limited = G > 1 && g.topk_group < G;
  const float scale = static_cast<float>(g.routed_scaling_factor);
  float* psm = sm.p + warp * E;
  float* selsm = sm.sel + warp * E;
  float* gscore = sm.gscore + warp * G;
  unsigned char* allowed = sm.allowed + warp * G;

  bool bias_ok = true;
  if (bias)
    for (int64_t e = lane; e < E; e += kWarp) bias_ok = bias_ok && isfinite(bias[e]);
  bias_ok = __all_sync(0xffffffffu, bias_ok);
  if (group_limited)
    for (int64_t e = threadIdx.x; e < E; e += kChunkThreads) sm.grp_of[e] = static_cast<uint16_t>(e / gsize);
  __syncthreads();

  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    for (int64_t e = threadIdx.x; e < E; e += kChunkThreads) sm.cnt[e] = 0;
    const int64_t t = c * kScoreSumChunk + warp;
    // A token past T (last chunk) or with a non-finite logit is not routed.
    bool routed = t < g.T;
    float p[NPL], sel[NPL];
    if (routed) {
      const T* x = logits + t * E;
      bool finite = bias_ok;
      float m = -INFINITY;
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int64_t e = lane + kWarp * i;
        const float v = e < E ? to_float(x[e]) : 0.0f;
        p[i] = v;
        finite = finite && isfinite(v);
        if (e < E) m = fmaxf(m, v);
      }
      routed = __all_sync(0xffffffffu, finite);
      if (routed) {
        if (g.softmax) {
#pragma unroll
          for (int off = 16; off >= 1; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
          // lane l sums e = l, l + 32, ... in order, then the butterfly (moe_params.h)
          float acc = 0.0f;
#pragma unroll
          for (int i = 0; i < NPL; ++i) {
            if (lane + kWarp * i < E) {
              p[i] = exp_nonpos(fsub(p[i], m));
              acc = fadd(acc, p[i]);
            }
          }
#pragma unroll
          for (int off = 16; off >= 1; off >>= 1) acc = fadd(acc, __shfl_xor_sync(0xffffffffu, acc, off));
#pragma unroll
          for (int i = 0; i < NPL; ++i) p[i] = fdiv(p[i], acc);
        } else {
#pragma unroll
          for (int i = 0; i < NPL; ++i) p[i] = sigmoid_score(p[i]);
        }
#pragma unroll
        for (int i = 0; i < NPL; ++i) {
          const int64_t e = lane + kWarp * i;
          if (e < E) {
            sel[i] = bias ? fadd(p[i], bias[e]) : p[i];
            psm[e] = p[i];
            if (group_limited) selsm[e] = sel[i];
          } else {
            sel[i] = -INFINITY;  // never a candidate (real selection scores are finite)
          }
        }
        __syncwarp();

        if (group_limited) {
          // group score = best + second best selection score (a multiset top-2,
          // so the scan order does not matter); one lane per group.
          for (int64_t grp = lane; grp < G; grp += kWarp) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int64_t e = grp * gsize; e < (grp + 1) * gsize; ++e) {
              const float v = selsm[e];
              if (v > b1) { b2 = b1; b1 = v; }
              else if (v > b2) { b2 = v; }
            }
            gscore[grp] = gsize >= 2 ? fadd(b1, b2) : b1;
            allowed[grp] = 0;
          }
          __syncwarp();
          for (int64_t r = 0; r < g.topk_group; ++r) {
            float bv = -INFINITY;
            int bi = -1;
            for (int64_t grp = lane; grp < G; grp += kWarp)
              if (!allowed[grp] && (bi < 0 || gscore[grp] > bv)) {
                bv = gscore[grp];
                bi = static_cast<int>(grp);
              }
            warp_argmax(bv, bi);
            if (lane == 0) allowed[bi] = 1;
            __syncwarp();
          }
#pragma unroll
          for (int i = 0; i < NPL; ++i) {
            const int64_t e = lane + kWarp * i;
            if (e < E && !allowed[sm.grp_of[e]]) sel[i] = -INFINITY;
          }
        }

        // top-k: k rounds of a lane argmax over its registers and a warp argmax;
        // the winner's owner lane retires it (-inf). Lane j keeps choice j.
        float wsel = 0.0f;
        int wid = 0;
        for (int64_t j = 0; j < k; ++j) {
          float bv = -INFINITY;
          int bi = -1;
#pragma unroll
          for (int i = 0; i < NPL; ++i)
            if (sel[i] != -INFINITY && (bi < 0 || sel[i] > bv)) {
              bv = sel[i];
              bi = lane + kWarp * i;
            }
          warp_argmax(bv, bi);
          if (lane == j) wid = bi;
          if ((bi & (kWarp - 1)) == lane) {
#pragma unroll
            for (int i = 0; i < NPL; ++i)
              if (lane + kWarp * i == bi) sel[i] = -INFINITY;
          }
        }
        if (lane < k) wsel = psm[wid];
        // weights: sequential sum over the choices in order
        float sum = 0.0f;
        for (int64_t j = 0; j < k; ++j) sum = fadd(sum, __shfl_sync(0xffffffffu, wsel, static_cast<int>(j)));
        if (lane < k) {
          float w = wsel;
          if (g.renormalize && sum > 0.0f) w = fdiv(w, sum);
          weights[t * k + lane] = fmul(w, scale);
          g.expert_ids[t * k + lane] = wid;
          sm.ids[warp * kMaxK + lane] = wid;
        }
      } else {
        if (lane < k) {
          g.expert_ids[t * k + lane] = -1;
          weights[t * k + lane] = 0.0f;
        }
      }
    }
    if (!routed && lane < k) sm.ids[warp * kMaxK + lane] = -1;
    __syncthreads();

    // Chunk: counts (integer atomics: exact in any order) and ranks inside the
    // chunk = earlier tokens of the chunk with the same expert.
    if (threadIdx.x < kChunkWarps * k) {
      const int tl = static_cast<int>(threadIdx.x / k), j = static_cast<int>(threadIdx.x % k);
      const int32_t e = sm.ids[tl * kMaxK + j];
      if (e >= 0) {
        int32_t r = 0;
        for (int t2 = 0; t2 < tl; ++t2)
          for (int64_t j2 = 0; j2 < k; ++j2) r += sm.ids[t2 * kMaxK + j2] == e;
        ws.local_rank[(c * kScoreSumChunk + tl) * k + j] = r;
        atomicAdd(&sm.cnt[e], 1);
      }
    }
    __syncthreads();
    // Score sums per expert: the chunk's routed tokens in token order.
    for (int64_t e = threadIdx.x; e < E; e += kChunkThreads) {
      float acc = 0.0f;
#pragma unroll
      for (int w = 0; w < kChunkWarps; ++w)
        if (sm.ids[w * kMaxK] >= 0) acc = fadd(acc, sm.p[w * E + e]);
      ws.partial[c * E + e] = acc;
      ws.chunk_counts[c * E + e] = sm.cnt[e];
    }
    __syncthreads();  // smem is reused by the next chunk
  }
}

// Scan over chunks: one block per kScanTile experts (a warp reads 32-byte
// segments of 4 chunk rows). Thread (q, ex) owns a contiguous range of chunks;
// the range totals are scanned over q in shared memory (integers: exact).
// Mean scores: mean lane m sums chunks m, m + kMeanLanes, ... sequentially,
// then the halving tree (the fixed order of moe_params.h).
constexpr int kScanTile = 8;
constexpr int kScanThreads = 1024;
constexpr int kScanGroups = kScanThreads / kScanTile;  // 128 chunk ranges per expert

__global__ void __launch_bounds__(kScanThreads) gating_scan_kernel(GatingParams g, Workspace ws,
                                                                   int64_t nchunks) {
  wait_for_preceding_grid();  // may be a dependent launch (launch_gating)
  __shared__ int32_t scan[kScanGroups][kScanTile];
  __shared__ float lanes[kMeanLanes][kScanTile];
  const int ex = threadIdx.x % kScanTile, q = threadIdx.x / kScanTile;
  const int64_t E = g.E;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kScanTile + ex;
  const bool on = e < E;
  const int64_t per = (nchunks + kScanGroups - 1) / kScanGroups;
  const int64_t c0 = min(nchunks, q * per), c1 = min(nchunks, c0 + per);
  int32_t mine = 0;
  if (on)
    for (int64_t c = c0; c < c1; ++c) mine += ws.chunk_counts[c * E + e];
  scan[q][ex] = mine;
  for (int m = q; m < kMeanLanes; m += kScanGroups) {
    float acc = 0.0f;
    if (on)
      for (int64_t c = m; c < nchunks; c += kMeanLanes) acc = fadd(acc, ws.partial[c * E + e]);
    lanes[m][ex] = acc;
  }
  __syncthreads();
  for (int s = 1; s < kScanGroups; s <<= 1) {  // inclusive Hillis-Steele over q
    const int32_t v = q >= s ? scan[q - s][ex] : 0;
    __syncthreads();
    scan[q][ex] += v;
    __syncthreads();
  }
  for (int half = kMeanLanes / 2; half >= 1; half >>= 1) {
    for (int m = q; m < half; m += kScanGroups) lanes[m][ex] = fadd(lanes[m][ex], lanes[m + half][ex]);
    __syncthreads();
  }
  if (!on) return;
  if (q == 0) {
    const int32_t total = scan[kScanGroups - 1][ex];
    g.routed_counts[e] = total;
    g.expert_counts[e] = (g.capacity < 0 || total < g.capacity) ? total : static_cast<int32_t>(g.capacity);
    static_cast<float*>(g.mean_scores)[e] = fdiv(lanes[0][ex], static_cast<float>(g.T > 0 ? g.T : 1));
  }
  int32_t run = scan[q][ex] - mine;  // exclusive
  for (int64_t c = c0; c < c1; ++c) {
    const int32_t n = ws.chunk_counts[c * E + e];
    ws.chunk_counts[c * E + e] = run;
    run += n;
  }
}

// Probability mode: offsets[e] = exclusive prefix of routed counts (E <= 1024:
// one block, one expert per thread), in int64: the total is up to T * k.
constexpr int kOffsetsThreads = 1024;

__global__ void __launch_bounds__(kOffsetsThreads) offsets_kernel(GatingParams g, Workspace ws) {
  wait_for_preceding_grid();  // may be a dependent launch (launch_gating)
  __shared__ int64_t scan[kOffsetsThreads];
  const int i = threadIdx.x;
  const int64_t mine = i < g.E ? g.routed_counts[i] : 0;
  scan[i] = mine;
  __syncthreads();
  for (int s = 1; s < kOffsetsThreads; s <<= 1) {
    const int64_t v = i >= s ? scan[i - s] : 0;
    __syncthreads();
    scan[i] += v;
    __syncthreads();
  }
  if (i < g.E) ws.offsets[i] = scan[i] - mine;
  if (i == 0) ws.offsets[g.E] = scan[kOffsetsThreads - 1];
}

__global__ void gating_slots_kernel(GatingParams g, Workspace ws) {
  wait_for_preceding_grid();  // may be a dependent launch (launch_gating)
  const int64_t n = g.T * g.k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int32_t e = g.expert_ids[i];
    int32_t slot = -1;
    if (e >= 0) {
      const int64_t t = i / g.k;
      const int32_t r = ws.chunk_counts[(t / kScoreSumChunk) * g.E + e] + ws.local_rank[i];
      if (g.drop_probability && g.capacity >= 0) ws.order[ws.offsets[e] + r] = i;
      slot = (g.capacity < 0 || g.drop_probability || r < g.capacity) ? r : -1;
    }
    g.slots[i] = slot;
  }
}

constexpr int kDropThreads = 256;

__global__ void __launch_bounds__(kDropThreads) probability_drop_kernel(GatingParams g, Workspace ws) {
  wait_for_preceding_grid();  // may be a dependent launch (launch_gating)
  __shared__ int32_t scan[kDropThreads];
  __shared__ int32_t carry;
  const int64_t e = blockIdx.x;
  const int64_t off = ws.offsets[e];
  const int64_t n = ws.offsets[e + 1] - off;
  if (n <= g.capacity) return;  // all kept: slot = rank already
  const int64_t* ord = ws.order + off;
  const float* w = static_cast<const float*>(g.weights);
  for (int64_t a = threadIdx.x; a < n; a += blockDim.x) {
    const float wa = w[ord[a]];
    int64_t better = 0;
    for (int64_t b = 0; b < n; ++b) {
      const float wb = w[ord[b]];
      better += (wb > wa) || (wb == wa && b < a);
    }
    ws.keep[off + a] = better < g.capacity;
  }
  __syncthreads();
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t tile = 0; tile < n; tile += blockDim.x) {
    const int64_t a = tile + threadIdx.x;
    const int32_t flag = a < n ? ws.keep[off + a] : 0;
    scan[threadIdx.x] = flag;
    __syncthreads();
    for (int s = 1; s < kDropThreads; s <<= 1) {  // inclusive Hillis-Steele scan (integers)
      const int32_t v = threadIdx.x >= s ? scan[threadIdx.x - s] : 0;
      __syncthreads();
      scan[threadIdx.x] += v;
      __syncthreads();
    }
    if (a < n) g.slots[ord[a]] = flag ? carry + scan[threadIdx.x] - 1 : -1;
    __syncthreads();
    if (threadIdx.x == 0) carry += scan[kDropThreads - 1];
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Gating v2: the default (DSK_MOE_KERNEL / _moe_cuda_kernel select v1 or v2).
// Every fp32 operation, its operands and order are v1's (so the results
// are v1's bits); what changes is how many instructions a token costs:
//   - selection scores become order keys once; a lane's candidates are its
//     registers with a nonzero key (0 lies below every float's key).
//   - group scores: when a group is whole registers (size 32 R: lane l holds
//     experts l + 32 i, so register i is in group i / R in every lane) a group's
//     top-2 is two redux.sync and a ballot instead of one lane scanning it in
//     shared memory, and the kept groups come from redux.sync rounds over lane
//     g = group g. Other group sizes keep v1's shared-memory path.
//   - top-k: each lane keeps its best and second best candidate; a round is two
//     redux.sync and only the winning lane moves on (to its second best, or on
//     its second win to a rescan below the one it gave up) instead of every
//     lane rescanning all its registers in every round.
//   - chunk: a token publishes its choices as one bit mask per lane; after one
//     barrier, counts and ranks inside the chunk are bit tests (no shared
//     atomics or zeroing, no loop over earlier tokens' choice lists; one
//     barrier per chunk instead of three, two when the block has another
//     chunk); score sums as in v1.
//   - sigmoid: one fdiv per score (v1 runs both sides of a branch with one each).
//   - scan: one block per 2 experts (v1: 8, so 4x the SMs), warp-shuffle scans
//     and one barrier instead of ~20; the same integer results and the same
//     mean-score summation tree.
// ---------------------------------------------------------------------------

constexpr unsigned kFull = 0xffffffffu;

// The float of an order_key (its inverse; a -0 comes back as +0).
__device__ __forceinline__ float key_float(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// moe_math.h's sigmoid_score with the same operations and operands, but one
// fdiv of a selected numerator (1 or t) instead of two fdivs on the two sides
// of a branch (lanes with scores of both signs would run both).
__device__ __forceinline__ float sigmoid_one_div(float x) {
  const float t = exp_nonpos(x >= 0.0f ? -x : x);
  return fdiv(x >= 0.0f ? 1.0f : t, fadd(1.0f, t));
}

// v2's group path: registers when a group is a multiple of 32 experts, else
// v1's shared-memory one (host and device decide alike).
__host__ __device__ inline bool v2_smem_groups(int E, int G, int topk_group) {
  return G > 1 && topk_group < G && (E / G) % kWarp != 0;
}

// Dynamic shared memory of the v2 rows kernel (one chunk per block at a time).
// Score rows have 32 NPL slots (padding included): a lane stores its registers
// without a bounds check, at fixed offsets.
struct RowsSmemV2 {
  float* p;          // [8][32 NPL] scores, for the chunk's score sums
  int32_t* ids;      // [8][kMaxK] the chunk's choices (-1: not routed)
  uint32_t* chosen;  // [8][32] bit i of lane l: the token chose expert l + 32 i
  int32_t* routed;   // [8]
  // shared-memory group path only:
  float* sel;              // [8][E] selection scores
  uint16_t* grp_of;        // [E]
  float* gscore;           // [8][G]
  unsigned char* allowed;  // [8][G]
};

__host__ __device__ inline int64_t rows_v2_smem_bytes(int npl, int64_t E, int64_t G, bool smem_groups) {
  int64_t b = align16(kChunkWarps * kWarp * npl * 4) + align16(kChunkWarps * kMaxK * 4) +
              align16(kChunkWarps * kWarp * 4) + align16(kChunkWarps * 4);
  if (smem_groups)
    b += align16(kChunkWarps * E * 4) + align16(E * 2) + align16(kChunkWarps * G * 4) +
         align16(kChunkWarps * G);
  return b;
}

__device__ inline RowsSmemV2 carve_rows_v2_smem(unsigned char* base, int npl, int64_t E, int64_t G,
                                                bool smem_groups) {
  RowsSmemV2 s{};
  s.p = reinterpret_cast<float*>(base);
  base += align16(kChunkWarps * kWarp * npl * 4);
  s.ids = reinterpret_cast<int32_t*>(base);
  base += align16(kChunkWarps * kMaxK * 4);
  s.chosen = reinterpret_cast<uint32_t*>(base);
  base += align16(kChunkWarps * kWarp * 4);
  s.routed = reinterpret_cast<int32_t*>(base);
  base += align16(kChunkWarps * 4);
  if (smem_groups) {
    s.sel = reinterpret_cast<float*>(base);
    base += align16(kChunkWarps * E * 4);
    s.grp_of = reinterpret_cast<uint16_t*>(base);
    base += align16(E * 2);
    s.gscore = reinterpret_cast<float*>(base);
    base += align16(kChunkWarps * G * 4);
    s.allowed = base;
  }
  return s;
}

// Group-limited routing when a group is R whole registers (R = group size / 32).
// Returns the registers of the topk_group kept groups as a bit mask.
template <int NPL>
__device__ __forceinline__ uint32_t kept_group_registers(const uint32_t (&key)[NPL], int R, int G,
                                                        int topk_group, int lane) {
  // Group score = best + second best selection score as a multiset: each lane's
  // top-2 keys over the group's registers, then the warp's. m1 = the best key;
  // the second is m1 again when two lanes hold it, else the best of the holder's
  // own second (which covers a tie inside that lane) and the other lanes' best.
  uint32_t g1 = 0u, g2 = 0u;  // lane g < G: group g's top-2
  uint32_t b1 = 0u, b2 = 0u;  // this lane's top-2 in the current group
  int fill = 0, grp = 0;      // warp-uniform
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    if (grp < G) {  // registers from G R on hold no expert (E < 32 NPL)
      const uint32_t v = key[i];
      if (v > b1) { b2 = b1; b1 = v; }
      else if (v > b2) { b2 = v; }
      if (++fill == R) {
        const uint32_t m1 = __reduce_max_sync(kFull, b1);
        const bool holder = b1 == m1;
        uint32_t m2 = __reduce_max_sync(kFull, holder ? b2 : b1);
        if (__popc(__ballot_sync(kFull, holder)) > 1) m2 = m1;
        if (lane == grp) { g1 = m1; g2 = m2; }
        b1 = b2 = 0u;
        fill = 0;
        ++grp;
      }
    }
  }
  // Lane g: its group's score (v1's fadd(best, second); group size >= 32) as a
  // key (real scores are never NaN: keys > 0). topk_group rounds: the best key,
  // ties to the lower group; the winner retires.
  uint32_t gkey = lane < G ? order_key(fadd(key_float(g1), key_float(g2))) : 0u;
  uint32_t keep = 0u;
  for (int r = 0; r < topk_group; ++r) {
    const uint32_t best = __reduce_max_sync(kFull, gkey);
    const uint32_t who = __reduce_min_sync(kFull, gkey == best ? static_cast<uint32_t>(lane) : kFull);
    if (static_cast<uint32_t>(lane) == who) gkey = 0u;
    keep |= ((1u << R) - 1u) << (who * R);  // G >= 2: R <= 16 and (who + 1) R <= 32
  }
  return keep;
}

// A lane's best and second best candidate (key, register; key 0: none) among
// all its registers, or (BOUNDED) among those ranked below (bound_key,
// bound_reg). Rank: key descending, then register ascending (in a lane, the
// lower register is the lower expert).
template <int NPL, bool BOUNDED>
__device__ __forceinline__ void lane_top2(const uint32_t (&key)[NPL], uint32_t bound_key,
                                          int bound_reg, uint32_t& k1, int& r1, uint32_t& k2,
                                          int& r2) {
  k1 = k2 = 0u;
  r1 = r2 = 0;
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const uint32_t v = key[i];
    const bool below = !BOUNDED || v < bound_key || (v == bound_key && i > bound_reg);
    if (below && v > k1) { k2 = k1; r2 = r1; k1 = v; r1 = i; }
    else if (below && v > k2) { k2 = v; r2 = i; }
  }
}

// Top-k of the warp's candidates, descending, ties to the lower expert: lane
// j < k gets choice j in wid, and bit i of `chosen` marks expert lane + 32 i.
template <int NPL>
__device__ __forceinline__ void warp_topk(const uint32_t (&key)[NPL], int k, int lane, int& wid,
                                          uint32_t& chosen) {
  uint32_t hk, sk;  // the lane's best remaining candidate and the next one
  int hr, sr;
  lane_top2<NPL, false>(key, 0u, 0, hk, hr, sk, sr);
  bool have_second = true;  // sk is the best below hk (false after a promotion)
  for (int j = 0; j < k; ++j) {
    const uint32_t best = __reduce_max_sync(kFull, hk);
    const uint32_t mine = (hk != 0u && hk == best) ? static_cast<uint32_t>(lane + kWarp * hr) : kFull;
    const uint32_t who = __reduce_min_sync(kFull, mine);  // the lowest expert with the best key
    if (lane == j) wid = who == kFull ? -1 : static_cast<int>(who);
    if (who != kFull && mine == who) {  // one lane: it gives up its best
      chosen |= 1u << hr;
      if (have_second) {
        hk = sk;
        hr = sr;
        have_second = false;
      } else {
        const uint32_t bk = hk;
        const int br = hr;
        lane_top2<NPL, true>(key, bk, br, hk, hr, sk, sr);
        have_second = true;
      }
    }
  }
}

// Blocks per SM the v2 rows kernel is compiled for (registers: 32 up to 8 experts
// per lane, then 64 and 128; ptxas -v reports no spills). Up to E = 256, 8 blocks
// of 8 warps fill an SM's 64 warps: 8448 tokens in one wave of an H100, where 6
// blocks (40 registers, the cap until session 7; an H100 ran that one) left
// T = 8192 in 1.3 waves, the second mostly idle (rows 17.7 us of the 25 us).
// Same instructions, so the same bits (tested on an H100, session 9; the rows kernel
// took 17.8 us at T = 8192, as before the cap).
constexpr int rows_v2_min_blocks(int npl) { return npl <= 8 ? 8 : (npl <= 16 ? 4 : 2); }

// NPL = experts per lane (E <= 32 * NPL): the row lives in registers.
template <typename T, int NPL>
__global__ void __launch_bounds__(kChunkThreads, rows_v2_min_blocks(NPL))
    gating_rows_v2_kernel(GatingParams g, Workspace ws, int64_t nchunks) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // E <= 1024 and k <= 16 (moe_api.cpp): in-block indices fit in int.
  const int E = static_cast<int>(g.E), G = static_cast<int>(g.n_group), gsize = E / G;
  const int k = static_cast<int>(g.k), topk_group = static_cast<int>(g.topk_group);
  const bool group_limited = G > 1 && topk_group < G;
  const bool smem_groups = v2_smem_groups(E, G, topk_group);
  const RowsSmemV2 sm = carve_rows_v2_smem(smem_raw, NPL, E, G, smem_groups);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const T* logits = static_cast<const T*>(g.logits);
  const float* bias = static_cast<const float*>(g.bias);
  float* weights = static_cast<float*>(g.weights);
  const float scale = static_cast<float>(g.routed_scaling_factor);
  constexpr int kRow = kWarp * NPL;  // score row stride in shared memory
  float* psm = sm.p + warp * kRow;

  bool bias_ok = true;
  if (bias)
    for (int e = lane; e < E; e += kWarp) bias_ok = bias_ok && isfinite(bias[e]);
  bias_ok = __all_sync(kFull, bias_ok);
  if (smem_groups) {
    for (int e = threadIdx.x; e < E; e += kChunkThreads) sm.grp_of[e] = static_cast<uint16_t>(e / gsize);
    __syncthreads();
  }

  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const int64_t t = c * kScoreSumChunk + warp;
    // A token past T (last chunk) or with a non-finite logit is not routed.
    bool routed = t < g.T;
    if (routed) {
      const T* x = logits + t * E;
      bool finite = bias_ok;
      float m = -INFINITY;
      float p[NPL];
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int e = lane + kWarp * i;
        const float v = e < E ? to_float(x[e]) : 0.0f;
        p[i] = v;
        finite = finite && isfinite(v);
        if (e < E) m = fmaxf(m, v);
      }
      routed = __all_sync(kFull, finite);
      if (routed) {
        // Scores: v1's operations in v1's order (moe_params.h).
        if (g.softmax) {
#pragma unroll
          for (int off = 16; off >= 1; off >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, off));
          float acc = 0.0f;
#pragma unroll
          for (int i = 0; i < NPL; ++i) {
            // Padding registers (e >= E) hold 0, not a logit: exp of -inf keeps
            // them inside exp_nonpos's domain (0 - m may be positive and huge).
            const bool real = lane + kWarp * i < E;
            p[i] = exp_nonpos(real ? fsub(p[i], m) : -INFINITY);
            if (real) acc = fadd(acc, p[i]);
          }
#pragma unroll
          for (int off = 16; off >= 1; off >>= 1) acc = fadd(acc, __shfl_xor_sync(kFull, acc, off));
#pragma unroll
          for (int i = 0; i < NPL; ++i) p[i] = fdiv(p[i], acc);
        } else {
#pragma unroll
          for (int i = 0; i < NPL; ++i) p[i] = sigmoid_one_div(p[i]);
        }
        // Selection scores as keys (padding registers: 0, no candidate), one
        // loop per bias case so that each is a few predicated instructions per
        // register and p dies as its keys are made.
        uint32_t key[NPL];
        float* selsm = smem_groups ? sm.sel + warp * E : nullptr;  // shared-memory group path
        if (bias) {
#pragma unroll
          for (int i = 0; i < NPL; ++i) {
            const int e = lane + kWarp * i;
            psm[e] = p[i];
            key[i] = 0u;
            if (e < E) {
              const float sel = fadd(p[i], bias[e]);
              if (smem_groups) selsm[e] = sel;
              key[i] = order_key(sel);
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < NPL; ++i) {
            const int e = lane + kWarp * i;
            psm[e] = p[i];
            if (smem_groups && e < E) selsm[e] = p[i];
            key[i] = e < E ? order_key(p[i]) : 0u;
          }
        }
        if (group_limited) {
          if (!smem_groups) {
            const uint32_t keep = kept_group_registers<NPL>(key, gsize / kWarp, G, topk_group, lane);
#pragma unroll
            for (int i = 0; i < NPL; ++i)
              if (!((keep >> i) & 1u)) key[i] = 0u;
          } else {
            // v1's path: one lane per group scans it in shared memory, then
            // topk_group warp argmax rounds (ties: lower group).
            float* gscore = sm.gscore + warp * G;
            unsigned char* allowed = sm.allowed + warp * G;
            __syncwarp();
            for (int grp = lane; grp < G; grp += kWarp) {
              float b1 = -INFINITY, b2 = -INFINITY;
              for (int e = grp * gsize; e < (grp + 1) * gsize; ++e) {
                const float v = selsm[e];
                if (v > b1) { b2 = b1; b1 = v; }
                else if (v > b2) { b2 = v; }
              }
              gscore[grp] = gsize >= 2 ? fadd(b1, b2) : b1;
              allowed[grp] = 0;
            }
            __syncwarp();
            for (int r = 0; r < topk_group; ++r) {
              float bv = -INFINITY;
              int bi = -1;
              for (int grp = lane; grp < G; grp += kWarp)
                if (!allowed[grp] && (bi < 0 || gscore[grp] > bv)) {
                  bv = gscore[grp];
                  bi = grp;
                }
              warp_argmax(bv, bi);
              if (lane == 0) allowed[bi] = 1;
              __syncwarp();
            }
#pragma unroll
            for (int i = 0; i < NPL; ++i) {
              const int e = lane + kWarp * i;
              if (e < E && !allowed[sm.grp_of[e]]) key[i] = 0u;
            }
          }
        }
        uint32_t chosen = 0;  // bit i: this lane's expert lane + 32 i was chosen
        int wid = -1;         // lane j < k: choice j
        warp_topk<NPL>(key, k, lane, wid, chosen);
        // Published before the weights: less state lives across fdiv's slow-path calls.
        sm.chosen[warp * kWarp + lane] = chosen;
        if (lane < k) {
          sm.ids[warp * kMaxK + lane] = wid;
          g.expert_ids[t * k + lane] = wid;
        }
        __syncwarp();  // psm of every lane
        float wsel = 0.0f;
        if (lane < k && wid >= 0) wsel = psm[wid];
        // weights: sequential sum over the choices in order (as v1)
        float sum = 0.0f;
        for (int j = 0; j < k; ++j) sum = fadd(sum, __shfl_sync(kFull, wsel, j));
        if (lane < k) {
          float w = wsel;
          if (g.renormalize && sum > 0.0f) w = fdiv(w, sum);
          weights[t * k + lane] = fmul(w, scale);
        }
      } else if (lane < k) {
        g.expert_ids[t * k + lane] = -1;
        weights[t * k + lane] = 0.0f;
      }
    }
    if (!routed) {
      sm.chosen[warp * kWarp + lane] = 0u;
      if (lane < k) sm.ids[warp * kMaxK + lane] = -1;
    }
    if (lane == 0) sm.routed[warp] = routed ? 1 : 0;
    __syncthreads();

    // Chunk, from the choice bits: rank of (token tl, choice j) = earlier tokens
    // of the chunk that chose its expert (a token chooses an expert at most once).
    // Thread tl * kMaxK + j (no division by k).
    if (threadIdx.x < kChunkWarps * kMaxK) {
      const int tl = static_cast<int>(threadIdx.x) / kMaxK, j = static_cast<int>(threadIdx.x) % kMaxK;
      const int32_t e = j < k ? sm.ids[tl * kMaxK + j] : -1;
      if (e >= 0) {
        const uint32_t* col = sm.chosen + (e % kWarp);
        const int bit = e / kWarp;
        int32_t r = 0;
#pragma unroll
        for (int w = 0; w < kChunkWarps - 1; ++w)
          if (w < tl) r += static_cast<int32_t>((col[w * kWarp] >> bit) & 1u);
        ws.local_rank[(c * kScoreSumChunk + tl) * k + j] = r;
      }
    }
    // Per expert: the chunk's count, and its score sum over the routed tokens in
    // token order (v1's order).
    for (int e = threadIdx.x; e < E; e += kChunkThreads) {
      const uint32_t* col = sm.chosen + (e % kWarp);
      const int bit = e / kWarp;
      float acc = 0.0f;
      int32_t n = 0;
#pragma unroll
      for (int w = 0; w < kChunkWarps; ++w) {
        if (sm.routed[w]) acc = fadd(acc, sm.p[w * kRow + e]);
        n += static_cast<int32_t>((col[w * kWarp] >> bit) & 1u);
      }
      ws.partial[c * E + e] = acc;
      ws.chunk_counts[c * E + e] = n;
    }
    if (c + gridDim.x < nchunks) __syncthreads();  // smem is reused by the next chunk
  }
}

// Scan v2: one block per kScanV2Experts experts, kScanV2Ranges contiguous chunk
// ranges per expert (thread (q, ex) = threadIdx q * kScanV2Experts + ex). Chunk
// bases: each range's total, scanned over q by warp shuffles and the warps'
// totals (integers: exact in any order). Mean scores in v1's order: thread q
// owns mean lanes q and q + 128 (sequential sums over chunks m, m + 256, ...),
// adds them (the tree's first level); warp 0 finishes the tree: levels 64, 32,
// 16 inside each lane (it holds lanes m, m + 16, ..., m + 112), then 8, 4, 2, 1
// by shuffles. A thread keeps its first kScanV2Cached chunk counts in registers
// (T <= 16384 needs no more), so the rewrite to bases only stores: the reads were
// a chain of load-store round trips (an H100 took 13 us at T = 8192, E = 256).
constexpr int kScanV2Experts = 2;
constexpr int kScanV2Cached = 16;
constexpr int kScanV2Threads = 256;
constexpr int kScanV2Warps = kScanV2Threads / kWarp;
constexpr int kScanV2Ranges = kScanV2Threads / kScanV2Experts;
static_assert(kMeanLanes == 2 * kScanV2Ranges, "thread q owns mean lanes q and q + 128");
static_assert(kScanV2Ranges == 8 * 16, "warp 0 finishes the tree with 16 lanes per expert");

__global__ void __launch_bounds__(kScanV2Threads)
    gating_scan_v2_kernel(GatingParams g, Workspace ws, int64_t nchunks) {
  wait_for_preceding_grid();  // may be a dependent launch (launch_gating)
  __shared__ int32_t warp_total[kScanV2Warps][kScanV2Experts];
  __shared__ float half_lanes[kScanV2Ranges][kScanV2Experts];  // mean lanes after the first level
  const int ex = threadIdx.x % kScanV2Experts, q = threadIdx.x / kScanV2Experts;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t E = g.E;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kScanV2Experts + ex;
  const bool on = e < E;
  const int64_t per = (nchunks + kScanV2Ranges - 1) / kScanV2Ranges;
  const int64_t c0 = min(nchunks, q * per), c1 = min(nchunks, c0 + per);
  int32_t mine = 0, cached[kScanV2Cached];
  float lo = 0.0f, hi = 0.0f;  // mean lanes q and q + 128
#pragma unroll
  for (int i = 0; i < kScanV2Cached; ++i) {  // predicated loads, all in flight at once
    cached[i] = on && c0 + i < c1 ? ws.chunk_counts[(c0 + i) * E + e] : 0;
    mine += cached[i];
  }
  if (on) {
#pragma unroll 4
    for (int64_t c = c0 + kScanV2Cached; c < c1; ++c) mine += ws.chunk_counts[c * E + e];
    // (unrolled: the loads go out together; the adds stay in order)
#pragma unroll 4
    for (int64_t c = q; c < nchunks; c += kMeanLanes) lo = fadd(lo, ws.partial[c * E + e]);
#pragma unroll 4
    for (int64_t c = q + kScanV2Ranges; c < nchunks; c += kMeanLanes) hi = fadd(hi, ws.partial[c * E + e]);
  }
  half_lanes[q][ex] = fadd(lo, hi);
  // Inclusive scan over the warp's q (lanes of one expert are kScanV2Experts apart).
  int32_t incl = mine;
#pragma unroll
  for (int d = kScanV2Experts; d < kWarp; d <<= 1) {
    const int32_t v = __shfl_up_sync(kFull, incl, d);
    if (lane >= d) incl += v;
  }
  if (lane >= kWarp - kScanV2Experts) warp_total[warp][ex] = incl;
  __syncthreads();
  int32_t before = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kScanV2Warps; ++w) {
    const int32_t v = warp_total[w][ex];
    before += w < warp ? v : 0;
    total += v;
  }
  if (warp == 0) {
    const int m = lane / kScanV2Experts;  // 0..15; ex = lane % kScanV2Experts
    float v[8];
#pragma unroll
    for (int r = 0; r < 8; ++r) v[r] = half_lanes[m + 16 * r][ex];
#pragma unroll
    for (int half = 4; half >= 1; half >>= 1)  // levels 64, 32, 16
#pragma unroll
      for (int r = 0; r < half; ++r) v[r] = fadd(v[r], v[r + half]);
    float acc = v[0];
#pragma unroll
    for (int half = 8; half >= 1; half >>= 1)  // levels 8, 4, 2, 1
      acc = fadd(acc, __shfl_down_sync(kFull, acc, half * kScanV2Experts));
    if (on && q == 0) {
      g.routed_counts[e] = total;
      g.expert_counts[e] = (g.capacity < 0 || total < g.capacity) ? total : static_cast<int32_t>(g.capacity);
      static_cast<float*>(g.mean_scores)[e] = fdiv(acc, static_cast<float>(g.T > 0 ? g.T : 1));
    }
  }
  if (!on) return;
  int32_t run = before + incl - mine;  // exclusive
#pragma unroll
  for (int i = 0; i < kScanV2Cached; ++i) {
    if (c0 + i < c1) ws.chunk_counts[(c0 + i) * E + e] = run;
    run += cached[i];  // 0 past c1
  }
  for (int64_t c = c0 + kScanV2Cached; c < c1; ++c) {
    const int32_t n = ws.chunk_counts[c * E + e];
    ws.chunk_counts[c * E + e] = run;
    run += n;
  }
}

// A rows kernel over the chunks with `smem` bytes of dynamic shared memory
// (its limit raised past the 48 KiB default when needed).
template <typename Kernel>
cudaError_t launch_rows_kernel(Kernel kernel, int64_t smem, const GatingParams& g, const Workspace& ws,
                               int64_t nchunks, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = grid_size(nchunks * kChunkThreads, kChunkThreads, 8);
  kernel<<<blocks, kChunkThreads, static_cast<size_t>(smem), stream>>>(g, ws, nchunks);
  return cudaGetLastError();
}

// The rows kernel of the chosen generation (GatingParams::cuda_kernel).
template <typename T, int NPL>
cudaError_t launch_gating_rows_any(const GatingParams& g, const Workspace& ws, int64_t nchunks,
                                   cudaStream_t stream) {
  if (g.cuda_kernel == 2) {
    const bool smem_groups = v2_smem_groups(static_cast<int>(g.E), static_cast<int>(g.n_group),
                                            static_cast<int>(g.topk_group));
    return launch_rows_kernel(gating_rows_v2_kernel<T, NPL>,
                              rows_v2_smem_bytes(NPL, g.E, g.n_group, smem_groups), g, ws, nchunks, stream);
  }
  return launch_rows_kernel(gating_rows_kernel<T, NPL>, rows_smem_bytes(g.E, g.n_group), g, ws, nchunks,
                            stream);
}

template <typename T>
cudaError_t launch_gating(const GatingParams& g, cudaStream_t stream) {
  const int64_t nchunks = (g.T + kScoreSumChunk - 1) / kScoreSumChunk;
  Workspace ws = carve(g.workspace, g.T, g.E, g.k);
  const bool v2 = g.cuda_kernel == 2;
  if (nchunks > 0) {
    cudaError_t err;
    if (g.E <= 32) err = launch_gating_rows_any<T, 1>(g, ws, nchunks, stream);
    else if (g.E <= 64) err = launch_gating_rows_any<T, 2>(g, ws, nchunks, stream);
    else if (g.E <= 128) err = launch_gating_rows_any<T, 4>(g, ws, nchunks, stream);
    else if (g.E <= 256) err = launch_gating_rows_any<T, 8>(g, ws, nchunks, stream);
    else if (g.E <= 512) err = launch_gating_rows_any<T, 16>(g, ws, nchunks, stream);
    else if (g.E <= 1024) err = launch_gating_rows_any<T, 32>(g, ws, nchunks, stream);
    else err = cudaErrorInvalidValue;  // moe_api.cpp enforces E <= 1024
    if (err != cudaSuccess) return err;
  }
  // The kernels after the first wait for their predecessor in the stream
  // (wait_for_preceding_grid); as dependent launches they start during its tail.
  const bool dep = g.dependent_launch && device_has_dependent_launch();
  const unsigned scan_blocks = static_cast<unsigned>(
      v2 ? (g.E + kScanV2Experts - 1) / kScanV2Experts : (g.E + kScanTile - 1) / kScanTile);
  cudaError_t err = v2 ? launch_dependent(dep, gating_scan_v2_kernel, scan_blocks, kScanV2Threads, 0,
                                          stream, g, ws, nchunks)
                       : launch_dependent(dep, gating_scan_kernel, scan_blocks, kScanThreads, 0, stream,
                                          g, ws, nchunks);
  if (err != cudaSuccess) return err;
  const bool prob = g.drop_probability && g.capacity >= 0;
  if (prob && (err = launch_dependent(dep, offsets_kernel, 1, kOffsetsThreads, 0, stream, g, ws)) !=
                  cudaSuccess)
    return err;
  if (g.T > 0) {
    const unsigned slot_blocks = static_cast<unsigned>(grid_size(g.T * g.k, 256));
    if ((err = launch_dependent(dep, gating_slots_kernel, slot_blocks, 256, 0, stream, g, ws)) !=
        cudaSuccess)
      return err;
    if (prob &&
        (err = launch_dependent(dep, probability_drop_kernel, static_cast<unsigned>(g.E), kDropThreads,
                                0, stream, g, ws)) != cudaSuccess)
      return err;
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------

// row_base null: expert e's rows start at e * capacity (dispatch/combine).
__device__ __forceinline__ int64_t choice_row(const RowsParams& p, int64_t i) {
  const int32_t e = p.expert_ids[i], s = p.slots[i];
  if (e < 0 || s < 0 || e >= p.E) return -1;
  const int64_t limit = p.slot_limit ? p.slot_limit[e] : p.capacity;
  if (s >= limit) return -1;  // out of range (also below -1): skipped on the GPU (the CPU raises)
  return (p.row_base ? p.row_base[e] : e * p.capacity) + s;
}

// gather / rows_dot: choice_row, and -1 for a row past src (unchecked offsets or
// row_base on the GPU): skipped, never read.
__device__ __forceinline__ int64_t src_choice_row(const RowsParams& p, int64_t i) {
  const int64_t row = choice_row(p, i);
  return row < p.src_rows ? row : -1;
}

constexpr int kRowsThreads = 128;
constexpr int kRowsWarps = kRowsThreads / kWarp;

// Scatter, step 1: dst row -> choice. atomicMax: two choices naming one row
// (invalid input) resolve to the later choice, as on the CPU, in any order.
__global__ void row_map_kernel(RowsParams p) {
  const int64_t n = p.T * p.k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = choice_row(p, i);
    if (r >= 0 && r < p.dst_rows)
      atomicMax(reinterpret_cast<long long*>(p.row_map) + r, static_cast<long long>(i));
  }
}

// Scatter, step 2, one launch with two roles; every dst row is written exactly
// once and each token row is read once (bytes = T*H read + dst_rows*H written):
//   blocks [0, token_blocks): one warp per token; its row, kUnroll vectors per
//     lane at a time, goes to each dst row it owns (times its weight);
//   the rest: one warp per dst row that no choice owns: zeros.
constexpr int kScatterUnroll = 4;

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowsThreads) scatter_rows_kernel(RowsParams p, int64_t token_blocks) {
  __shared__ int64_t rows_s[kRowsWarps][kMaxK];
  __shared__ float w_s[kRowsWarps][kMaxK];
  using V = Vec<T, VEC>;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const T* __restrict__ src = static_cast<const T*>(p.src);
  T* __restrict__ dst = static_cast<T*>(p.dst);
  const float* w = static_cast<const float*>(p.weights);
  const int64_t nvec = p.H / VEC;
  if (blockIdx.x >= token_blocks) {
    const int64_t zb = blockIdx.x - token_blocks, zblocks = gridDim.x - token_blocks;
    V z;
#pragma unroll
    for (int q = 0; q < VEC; ++q) z.v[q] = from_float<T>(0.0f);
    for (int64_t r = zb * kRowsWarps + warp; r < p.dst_rows; r += zblocks * kRowsWarps) {
      if (p.row_map[r] >= 0) continue;  // written by its token
      V* out = reinterpret_cast<V*>(dst + r * p.H);
      for (int64_t v = lane; v < nvec; v += kWarp) out[v] = z;
    }
    return;
  }
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsWarps + warp; t < p.T;
       t += token_blocks * kRowsWarps) {
    // The rows this token owns, compacted (choice order) into shared memory.
    int64_t r = -1;
    if (lane < p.k) {
      const int64_t i = t * p.k + lane;
      r = choice_row(p, i);
      if (r >= p.dst_rows || (r >= 0 && p.row_map[r] != i)) r = -1;
    }
    const unsigned own = __ballot_sync(0xffffffffu, r >= 0);
    const int nk = __popc(own);
    if (r >= 0) {
      const int pos = __popc(own & ((1u << lane) - 1u));
      rows_s[warp][pos] = r * p.H;
      w_s[warp][pos] = w ? w[t * p.k + lane] : 1.0f;
    }
    __syncwarp();
    if (nk > 0) {
      const V* x = reinterpret_cast<const V*>(src + t * p.H);
      for (int64_t v0 = lane; v0 < nvec; v0 += kWarp * kScatterUnroll) {
        V xv[kScatterUnroll];
#pragma unroll
        for (int u = 0; u < kScatterUnroll; ++u)
          if (v0 + u * kWarp < nvec) xv[u] = x[v0 + u * kWarp];
        for (int q = 0; q < nk; ++q) {
          V* out = reinterpret_cast<V*>(dst + rows_s[warp][q]);
          if (w) {
            const float wq = w_s[warp][q];
#pragma unroll
            for (int u = 0; u < kScatterUnroll; ++u) {
              if (v0 + u * kWarp >= nvec) continue;
              V o;
#pragma unroll
              for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(fmul(wq, to_float(xv[u].v[e])));
              out[v0 + u * kWarp] = o;
            }
          } else {
#pragma unroll
            for (int u = 0; u < kScatterUnroll; ++u)
              if (v0 + u * kWarp < nvec) out[v0 + u * kWarp] = xv[u];
          }
        }
      }
    }
    __syncwarp();  // rows_s is rewritten for the next token
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowsThreads) gather_rows_kernel(RowsParams p) {
  __shared__ int64_t rows_s[kRowsWarps][kMaxK];
  __shared__ float w_s[kRowsWarps][kMaxK];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  const float* w = static_cast<const float*>(p.weights);
  const int64_t nvec = p.H / VEC;
  for (int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; t < p.T;
       t += warps) {
    // The token's k rows and weights, in shared memory: lanes leave the H loop
    // at different times, so no shuffles inside it.
    if (lane < p.k) {
      rows_s[warp][lane] = src_choice_row(p, t * p.k + lane);
      w_s[warp][lane] = w ? w[t * p.k + lane] : 1.0f;
    }
    __syncwarp();
    for (int64_t v = lane; v < nvec; v += kWarp) {
      float acc[VEC];
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] = 0.0f;
      for (int64_t j = 0; j < p.k; ++j) {
        const int64_t r = rows_s[warp][j];
        const float wj = w_s[warp][j];
        if (r < 0) continue;
        const Vec<T, VEC> rv = *reinterpret_cast<const Vec<T, VEC>*>(src + r * p.H + v * VEC);
#pragma unroll
        for (int q = 0; q < VEC; ++q)
          acc[q] = w ? fadd(acc[q], fmul(wj, to_float(rv.v[q]))) : fadd(acc[q], to_float(rv.v[q]));
      }
      Vec<T, VEC> o;
#pragma unroll
      for (int q = 0; q < VEC; ++q) o.v[q] = from_float<T>(acc[q]);
      *reinterpret_cast<Vec<T, VEC>*>(dst + t * p.H + v * VEC) = o;
    }
    __syncwarp();
  }
}

// One warp per token; lane l sums h = l, l + 32, ... then an xor butterfly
// (the order of rows_dot_cpu).
template <typename T>
__global__ void __launch_bounds__(kRowsThreads) rows_dot_kernel(RowsParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const T* src = static_cast<const T*>(p.src);
  const T* other = static_cast<const T*>(p.other);
  float* dst = static_cast<float*>(p.dst);
  for (int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; t < p.T;
       t += warps) {
    const T* o = other + t * p.H;
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t row = src_choice_row(p, t * p.k + j);  // warp-uniform
      float acc = 0.0f;
      if (row >= 0) {
        const T* r = src + row * p.H;
        for (int64_t h = lane; h < p.H; h += kWarp) acc = fadd(acc, fmul(to_float(o[h]), to_float(r[h])));
      }
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) acc = fadd(acc, __shfl_xor_sync(0xffffffffu, acc, off));
      if (lane == 0) dst[t * p.k + j] = acc;
    }
  }
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, bool GATHER>
cudaError_t launch_rows(const RowsParams& p, cudaStream_t stream) {
  if (p.H == 0 || (GATHER ? p.T : p.dst_rows) == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kThreads = kRowsThreads;
  const bool vec_ok = p.H % kVec == 0 && aligned16(p.src) && aligned16(p.dst);
  if (GATHER) {
    const int64_t blocks = grid_size(p.T * kWarp, kThreads);
    if (vec_ok) gather_rows_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(p);
    else gather_rows_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  if (p.T * p.k > 0) {
    row_map_kernel<<<grid_size(p.T * p.k, 256), 256, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // Token blocks first (one warp per token), then the zero-row blocks.
  const int64_t token_blocks = p.T > 0 ? grid_size(p.T * kWarp, kThreads) : 0;
  const int64_t blocks = token_blocks + grid_size(p.dst_rows * kWarp, kThreads);
  if (vec_ok) scatter_rows_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(p, token_blocks);
  else scatter_rows_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p, token_blocks);
  return cudaGetLastError();
}

template <bool GATHER>
int rows_dispatch(const RowsParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: return static_cast<int>(launch_rows<float, GATHER>(p, s));
    case DType::kFloat16: return static_cast<int>(launch_rows<__half, GATHER>(p, s));
    case DType::kBFloat16: return static_cast<int>(launch_rows<__nv_bfloat16, GATHER>(p, s));
    default: return static_cast<int>(cudaErrorInvalidValue);  // fp64 is CPU only
  }
}

}  // namespace

int64_t gating_workspace_bytes(int64_t T, int64_t E, int64_t k) {
  const int64_t nchunks = (T + kScoreSumChunk - 1) / kScoreSumChunk;
  // carve(): chunk_counts, partial; local_rank, keep (int32) and order (int64); offsets (int64).
  return 2 * align16(nchunks * E * 4) + 2 * align16(T * k * 4) + align16(T * k * 8) +
         align16((E + 1) * 8) + 16;
}

int gating_cuda(const GatingParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.logits_dtype) {
    case DType::kFloat32: return static_cast<int>(launch_gating<float>(p, s));
    case DType::kFloat16: return static_cast<int>(launch_gating<__half>(p, s));
    case DType::kBFloat16: return static_cast<int>(launch_gating<__nv_bfloat16>(p, s));
    default: return static_cast<int>(cudaErrorInvalidValue);  // fp64 is CPU only
  }
}

int scatter_rows_cuda(const RowsParams& p, void* stream) { return rows_dispatch<false>(p, stream); }
int gather_rows_cuda(const RowsParams& p, void* stream) { return rows_dispatch<true>(p, stream); }

int rows_dot_cuda(const RowsParams& p, void* stream) {
  if (p.T == 0 || p.k == 0) return static_cast<int>(cudaSuccess);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t blocks = grid_size(p.T * kWarp, kRowsThreads);
  switch (p.dtype) {
    case DType::kFloat32: rows_dot_kernel<float><<<blocks, kRowsThreads, 0, s>>>(p); break;
    case DType::kFloat16: rows_dot_kernel<__half><<<blocks, kRowsThreads, 0, s>>>(p); break;
    case DType::kBFloat16: rows_dot_kernel<__nv_bfloat16><<<blocks, kRowsThreads, 0, s>>>(p); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace dsk::moe
