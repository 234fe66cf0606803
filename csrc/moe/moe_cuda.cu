// CUDA kernels for MoE routing. No torch headers: moe_api.cpp validates the
// tensors and fills the params structs. Determinism: every floating-point sum
// has a fixed order (moe_params.h), and slots come from per-chunk counts and a
// sequential scan over chunks per expert, never from the order of atomics.
//
// gating, in four launches:
//   1. rows: one warp per chunk of kScoreSumChunk (8) token rows, one row at a
//      time: scores (softmax sum as 32 strided lane sums + xor butterfly), group
//      scores, topk_group groups and top-k by warp argmax (ties: lower index),
//      weights; per chunk the per-expert counts, ranks inside the chunk (lane 0,
//      row order) and score sums. Per-warp scratch in shared memory.
//   2. experts: one thread per expert, sequentially over chunks: chunk bases,
//      routed/kept counts, mean scores; then (probability mode) offsets.
//   3. slots: one thread per choice: rank = chunk base + rank in chunk.
//   4. probability mode only: one block per over-full expert; a choice's weight
//      rank among its expert's choices (ties: earlier token) decides whether it is
//      kept; kept ones are renumbered in token order by a block prefix sum.
// rows (dispatch/combine/permute/unpermute): one warp per token, 16-byte
// vectors along H; a token's row is read once and written to its k rows
// (scatter), or its k rows are accumulated in choice order in fp32 (gather).
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
  int32_t* order;         // [T * k] choices by (expert, rank)
  int32_t* offsets;       // [E + 1]
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
  w.order = reinterpret_cast<int32_t*>(p);
  p += align16(T * k * 4);
  w.offsets = reinterpret_cast<int32_t*>(p);
  p += align16((E + 1) * 4);
  w.keep = reinterpret_cast<int32_t*>(p);
  return w;
}

// Warp argmax over (value, index) candidates; ties go to the lower index,
// idx < 0 means "no candidate". Every lane gets the result.
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, off);
    const bool better = oi >= 0 && (idx < 0 || ov > v || (ov == v && oi < idx));
    if (better) {
      v = ov;
      idx = oi;
    }
  }
}

// Per-warp shared scratch of the rows kernel.
__host__ __device__ inline int64_t rows_smem_per_warp(int64_t E, int64_t G) {
  return align16(E * 4) * 4 + align16(G * 4) + align16(G);
}

template <typename T>
__global__ void gating_rows_kernel(GatingParams g, Workspace ws, int64_t nchunks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t E = g.E, G = g.n_group, gsize = E / G, k = g.k;
  unsigned char* base = smem + warp * rows_smem_per_warp(E, G);
  float* p = reinterpret_cast<float*>(base);
  float* sel = reinterpret_cast<float*>(base + align16(E * 4));
  float* part = reinterpret_cast<float*>(base + 2 * align16(E * 4));
  int32_t* cnt = reinterpret_cast<int32_t*>(base + 3 * align16(E * 4));
  float* gscore = reinterpret_cast<float*>(base + 4 * align16(E * 4));
  unsigned char* allowed = base + 4 * align16(E * 4) + align16(G * 4);
  const T* logits = static_cast<const T*>(g.logits);
  const float* bias = static_cast<const float*>(g.bias);
  float* weights = static_cast<float*>(g.weights);
  const bool group_limited = G > 1 && g.topk_group < G;
  const float scale = static_cast<float>(g.routed_scaling_factor);

  bool bias_ok = true;
  if (bias)
    for (int64_t e = lane; e < E; e += kWarp) bias_ok = bias_ok && isfinite(bias[e]);
  bias_ok = __all_sync(0xffffffffu, bias_ok);

  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp; c < nchunks;
       c += warps_in_grid) {
    for (int64_t e = lane; e < E; e += kWarp) {
      part[e] = 0.0f;
      cnt[e] = 0;
    }
    __syncwarp();
    const int64_t t_end = min(g.T, (c + 1) * kScoreSumChunk);
    for (int64_t t = c * kScoreSumChunk; t < t_end; ++t) {
      const T* x = logits + t * E;
      bool finite = bias_ok;
      float m = -INFINITY;
      for (int64_t e = lane; e < E; e += kWarp) {
        const float v = to_float(x[e]);
        p[e] = v;
        finite = finite && isfinite(v);
        m = fmaxf(m, v);
      }
      if (!__all_sync(0xffffffffu, finite)) {
        if (lane < k) {
          g.expert_ids[t * k + lane] = -1;
          weights[t * k + lane] = 0.0f;
        }
        __syncwarp();
        continue;
      }
      if (g.softmax) {
#pragma unroll
        for (int off = 16; off >= 1; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        float acc = 0.0f;
        for (int64_t e = lane; e < E; e += kWarp) {
          const float s = exp_nonpos(fsub(p[e], m));
          p[e] = s;
          acc = fadd(acc, s);
        }
#pragma unroll
        for (int off = 16; off >= 1; off >>= 1) acc = fadd(acc, __shfl_xor_sync(0xffffffffu, acc, off));
        for (int64_t e = lane; e < E; e += kWarp) p[e] = fdiv(p[e], acc);
      } else {
        for (int64_t e = lane; e < E; e += kWarp) p[e] = sigmoid_score(p[e]);
      }
      for (int64_t e = lane; e < E; e += kWarp) {
        sel[e] = bias ? fadd(p[e], bias[e]) : p[e];
        part[e] = fadd(part[e], p[e]);
      }
      __syncwarp();

      if (group_limited) {
        for (int64_t grp = lane; grp < G; grp += kWarp) {
          float b1 = -INFINITY, b2 = -INFINITY;
          for (int64_t e = grp * gsize; e < (grp + 1) * gsize; ++e) {
            const float v = sel[e];
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
      }

      // top-k: a taken expert's selection score becomes -inf (real ones are finite).
      float wsel = 0.0f;  // lane j < k keeps choice j's score
      int wid = 0;
      for (int64_t j = 0; j < k; ++j) {
        float bv = -INFINITY;
        int bi = -1;
        for (int64_t e = lane; e < E; e += kWarp) {
          if (group_limited && !allowed[e / gsize]) continue;
          const float v = sel[e];
          if (v != -INFINITY && (bi < 0 || v > bv)) {
            bv = v;
            bi = static_cast<int>(e);
          }
        }
        warp_argmax(bv, bi);
        if (lane == j) {
          wid = bi;
          wsel = p[bi];
        }
        if (lane == 0) sel[bi] = -INFINITY;
        __syncwarp();
      }
      // weights: sequential sum over choices (lane 0 gathers them in order).
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) sum = fadd(sum, __shfl_sync(0xffffffffu, wsel, static_cast<int>(j)));
      if (lane < k) {
        float w = wsel;
        if (g.renormalize && sum > 0.0f) w = fdiv(w, sum);
        weights[t * k + lane] = fmul(w, scale);
        g.expert_ids[t * k + lane] = wid;
      }
      // ranks inside the chunk: lane 0, choice order (a token's experts are distinct)
      for (int64_t j = 0; j < k; ++j) {
        const int e = __shfl_sync(0xffffffffu, wid, static_cast<int>(j));
        if (lane == 0) ws.local_rank[t * k + j] = cnt[e]++;
      }
      __syncwarp();
    }
    for (int64_t e = lane; e < E; e += kWarp) {
      ws.chunk_counts[c * E + e] = cnt[e];
      ws.partial[c * E + e] = part[e];
    }
    __syncwarp();
  }
}

// One block of kMeanLanes threads per expert. Chunk bases: thread l scans a
// contiguous range of chunks, the range totals are prefix-summed in shared
// memory (integers: exact in any order). Mean score: thread l sums chunks
// l, l + kMeanLanes, ... sequentially, then a halving tree (the fixed order of
// moe_params.h).
__global__ void __launch_bounds__(kMeanLanes) gating_experts_kernel(GatingParams g, Workspace ws,
                                                                    int64_t nchunks) {
  __shared__ int32_t tot[kMeanLanes];
  __shared__ float lanes[kMeanLanes];
  const int64_t e = blockIdx.x;
  const int l = threadIdx.x;
  const int64_t per = (nchunks + kMeanLanes - 1) / kMeanLanes;
  const int64_t c0 = min(nchunks, l * per), c1 = min(nchunks, c0 + per);
  int32_t mine = 0;
  for (int64_t c = c0; c < c1; ++c) mine += ws.chunk_counts[c * g.E + e];
  float acc = 0.0f;
  for (int64_t c = l; c < nchunks; c += kMeanLanes) acc = fadd(acc, ws.partial[c * g.E + e]);
  tot[l] = mine;
  lanes[l] = acc;
  __syncthreads();
  for (int half = kMeanLanes / 2; half >= 1; half >>= 1) {
    if (l < half) lanes[l] = fadd(lanes[l], lanes[l + half]);
    __syncthreads();
  }
  if (l == 0) {  // exclusive prefix of the 256 range totals, and the expert's counts
    int32_t run = 0;
    for (int i = 0; i < kMeanLanes; ++i) {
      const int32_t n = tot[i];
      tot[i] = run;
      run += n;
    }
    g.routed_counts[e] = run;
    g.expert_counts[e] = (g.capacity < 0 || run < g.capacity) ? run : static_cast<int32_t>(g.capacity);
    static_cast<float*>(g.mean_scores)[e] = fdiv(lanes[0], static_cast<float>(g.T > 0 ? g.T : 1));
  }
  __syncthreads();
  int32_t run = tot[l];
  for (int64_t c = c0; c < c1; ++c) {
    const int32_t n = ws.chunk_counts[c * g.E + e];
    ws.chunk_counts[c * g.E + e] = run;
    run += n;
  }
}

__global__ void offsets_kernel(GatingParams g, Workspace ws) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int32_t run = 0;
  for (int64_t e = 0; e < g.E; ++e) {
    ws.offsets[e] = run;
    run += g.routed_counts[e];
  }
  ws.offsets[g.E] = run;
}

__global__ void gating_slots_kernel(GatingParams g, Workspace ws) {
  const int64_t n = g.T * g.k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int32_t e = g.expert_ids[i];
    int32_t slot = -1;
    if (e >= 0) {
      const int64_t t = i / g.k;
      const int32_t r = ws.chunk_counts[(t / kScoreSumChunk) * g.E + e] + ws.local_rank[i];
      if (g.drop_probability && g.capacity >= 0) ws.order[ws.offsets[e] + r] = static_cast<int32_t>(i);
      slot = (g.capacity < 0 || g.drop_probability || r < g.capacity) ? r : -1;
    }
    g.slots[i] = slot;
  }
}

constexpr int kDropThreads = 256;

__global__ void __launch_bounds__(kDropThreads) probability_drop_kernel(GatingParams g, Workspace ws) {
  __shared__ int32_t scan[kDropThreads];
  __shared__ int32_t carry;
  const int64_t e = blockIdx.x;
  const int64_t off = ws.offsets[e];
  const int64_t n = ws.offsets[e + 1] - off;
  if (n <= g.capacity) return;  // all kept: slot = rank already
  const int32_t* ord = ws.order + off;
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

template <typename T>
cudaError_t launch_gating(const GatingParams& g, cudaStream_t stream) {
  const int64_t nchunks = (g.T + kScoreSumChunk - 1) / kScoreSumChunk;
  Workspace ws = carve(g.workspace, g.T, g.E, g.k);
  const int64_t per_warp = rows_smem_per_warp(g.E, g.n_group);
  int warps = 4;
  while (warps > 1 && per_warp * warps > 48 * 1024) warps /= 2;
  const size_t smem = static_cast<size_t>(per_warp * warps);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(gating_rows_kernel<T>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  if (nchunks > 0) {
    const int64_t blocks = grid_size(nchunks * kWarp, warps * kWarp, 8);
    gating_rows_kernel<T><<<blocks, warps * kWarp, smem, stream>>>(g, ws, nchunks);
  }
  gating_experts_kernel<<<g.E, kMeanLanes, 0, stream>>>(g, ws, nchunks);
  const bool prob = g.drop_probability && g.capacity >= 0;
  if (prob) offsets_kernel<<<1, 1, 0, stream>>>(g, ws);
  if (g.T > 0) {
    gating_slots_kernel<<<grid_size(g.T * g.k, 256), 256, 0, stream>>>(g, ws);
    if (prob) probability_drop_kernel<<<g.E, kDropThreads, 0, stream>>>(g, ws);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------

__device__ __forceinline__ int64_t choice_row(const RowsParams& p, int64_t i) {
  const int32_t e = p.expert_ids[i], s = p.slots[i];
  if (e < 0 || s < 0 || e >= p.E) return -1;
  const int64_t limit = p.slot_limit ? p.slot_limit[e] : p.capacity;
  if (s >= limit) return -1;  // out of range: skipped on the GPU (the CPU raises)
  return p.row_base[e] + s;
}

constexpr int kRowsThreads = 128;
constexpr int kRowsWarps = kRowsThreads / kWarp;
constexpr int kMaxK = 16;  // moe_api.cpp enforces k <= 16

// Scatter, step 1: dst row -> choice (each kept choice owns its row).
__global__ void row_map_kernel(RowsParams p) {
  const int64_t n = p.T * p.k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = choice_row(p, i);
    if (r >= 0 && r < p.dst_rows) p.row_map[r] = i;
  }
}

// Scatter, step 2: one warp per dst row, written exactly once: its token's row
// (times its weight), or zeros. No separate zero fill of dst.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowsThreads) scatter_rows_kernel(RowsParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  const float* w = static_cast<const float*>(p.weights);
  const int64_t nvec = p.H / VEC;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
       r < p.dst_rows; r += warps) {
    const int64_t i = p.row_map[r];
    Vec<T, VEC>* out = reinterpret_cast<Vec<T, VEC>*>(dst + r * p.H);
    if (i < 0) {
      Vec<T, VEC> z;
#pragma unroll
      for (int q = 0; q < VEC; ++q) z.v[q] = from_float<T>(0.0f);
      for (int64_t v = lane; v < nvec; v += kWarp) out[v] = z;
      continue;
    }
    const Vec<T, VEC>* x = reinterpret_cast<const Vec<T, VEC>*>(src + (i / p.k) * p.H);
    if (w) {
      const float wi = w[i];
      for (int64_t v = lane; v < nvec; v += kWarp) {
        const Vec<T, VEC> xv = x[v];
        Vec<T, VEC> o;
#pragma unroll
        for (int q = 0; q < VEC; ++q) o.v[q] = from_float<T>(fmul(wi, to_float(xv.v[q])));
        out[v] = o;
      }
    } else {
      for (int64_t v = lane; v < nvec; v += kWarp) out[v] = x[v];
    }
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
      rows_s[warp][lane] = choice_row(p, t * p.k + lane);
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
      const int64_t row = choice_row(p, t * p.k + j);  // warp-uniform
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
  const int64_t blocks = grid_size((GATHER ? p.T : p.dst_rows) * kWarp, kThreads);
  if (!GATHER && p.T * p.k > 0)
    row_map_kernel<<<grid_size(p.T * p.k, 256), 256, 0, stream>>>(p);
  const bool vec_ok = p.H % kVec == 0 && aligned16(p.src) && aligned16(p.dst);
  if (vec_ok) {
    if (GATHER) gather_rows_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(p);
    else scatter_rows_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    if (GATHER) gather_rows_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p);
    else scatter_rows_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(p);
  }
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
  return 2 * align16(nchunks * E * 4) + 3 * align16(T * k * 4) + align16((E + 1) * 4) + 16;
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
