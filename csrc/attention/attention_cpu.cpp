// CPU kernels for exact attention (FlashAttention-2's algorithm on CPU).
//
// Both passes keep the queries along the vector lanes: a block of queries is
// converted once to the compute type (fp32; fp64 for fp64 data) and
// transposed into strips one register tile wide, so that every per-query step
// of the softmax (max, exp, sum, rescale) is an element-wise vector op and
// every product is a register-tiled loop that broadcasts K's and V's elements
// straight from their rows (fp32 K and V are never copied or transposed).
//
// Forward: one work item per (sample, query head, block of kFwdBlockQ
// queries); each block of kFwdBlockK keys is scored and folded into a running
// max / sum / output (online softmax in base 2). Nothing of size Lq x Lk is
// ever stored. Blocks of fewer than kFwdRowQ queries (decoding) go one query
// at a time with the head dims along the lanes instead of padding a strip.
//
// Backward: one work item per (sample, kv head), which owns dk and dv of its
// keys and dq of the queries of its query heads; p is recomputed from the
// saved lse, and each (query block, key block) pair takes the five products of
// FlashAttention-2 (s, dp, dq, dk, dv) with no atomics.
//
// Work items go to threads one at a time, every output row has one writer and
// every sum a fixed order: results do not depend on the thread count
// (deterministic).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/attention_params.h"

// GCC warns (-Wpsabi) wherever a 32-byte vector is passed or returned in code
// built without AVX, since the calling convention differs; the vector helpers
// below are always inlined into their callers, so no such call is ever made.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace dsk::attention {
namespace {

constexpr double kLn2 = 0.6931471805599453;

template <typename T> struct ComputeOf { using type = float; };
template <> struct ComputeOf<double> { using type = double; };

// n rows of D elements (row stride `stride` elements) -> dst[n][D] as S.
template <typename T, typename S>
void load_rows(const T* src, int64_t stride, int64_t n, int64_t D, S* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + r * stride;
    S* d = dst + r * D;
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<S>(s[c]);
  }
}

// A block of n K and V rows starting at element offset `koff` (row stride
// `stride`), as S rows: fp32/fp64 in place, other dtypes converted into kbuf and
// vbuf (then with row stride D).
template <typename S>
struct KvRows {
  const S* k;
  const S* v;
  int64_t stride;
};

template <typename T, typename S>
KvRows<S> kv_rows(const AttnParams& p, int64_t koff, int64_t stride, int64_t n, S* kbuf, S* vbuf) {
  const T* kb = static_cast<const T*>(p.k) + koff;
  const T* vb = static_cast<const T*>(p.v) + koff;
  if constexpr (std::is_same_v<T, S>) {
    return {kb, vb, stride};
  } else {
    load_rows(kb, stride, n, p.D, kbuf);
    load_rows(vb, stride, n, p.D, vbuf);
    return {kbuf, vbuf, p.D};
  }
}

// Rows [0, n) of D elements (row stride `stride`) as the columns of strips of
// W: dst[(i / W) * D * W + c * W + i % W] = src[i][c] * scale, and columns
// [n, round_up(n, W)) zero.
template <typename T, typename S>
void load_strips(const T* src, int64_t stride, int64_t n, int64_t D, int64_t W, S scale, S* dst) {
  const int64_t cols = (n + W - 1) / W * W;
  for (int64_t i = 0; i < cols; ++i) {
    S* col = dst + (i / W) * D * W + i % W;
    for (int64_t c = 0; c < D; ++c)
      col[c * W] = i < n ? static_cast<S>(src[i * stride + c]) * scale : S(0);
  }
}

// The inverse for the outputs: dst[i][c] = src's column i, row c * scale, i < n.
template <typename T, typename S>
void store_strips(const S* src, int64_t n, int64_t D, int64_t W, S scale, T* dst, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    const S* col = src + (i / W) * D * W + i % W;
    for (int64_t c = 0; c < D; ++c) dst[i * stride + c] = static_cast<T>(col[c * W] * scale);
  }
}

// The hot loops are compiled for x86-64-v4 (AVX-512), v3 (AVX2 + FMA) and the
// baseline ISA and picked at load time (the build has no -march). Vectors run
// only across independent outputs and every sum has a fixed order, so results
// do not depend on threads or runs; the block products (DSK_CPU_FMA) may fuse
// multiply-adds where the CPU has FMA, so bits can differ between CPU models.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DSK_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define DSK_CPU_FMA __attribute__((optimize("fp-contract=fast")))
#else
#define DSK_CPU_CLONES
#define DSK_CPU_FMA
#endif

#if defined(__GNUC__)
#define DSK_INLINE inline __attribute__((always_inline))
#else
#define DSK_INLINE inline
#endif

// 32-byte vectors of S (8 floats, 4 doubles) through GCC vector extensions,
// which each clone compiles for its ISA (two SSE halves on the baseline).
template <typename S>
struct Vec {
  typedef S type __attribute__((vector_size(32)));
  static constexpr int64_t kLanes = 32 / sizeof(S);
  static constexpr int64_t kTile = 2 * kLanes;  // columns of a register tile
};

// Loads and stores through memcpy: no alignment assumed (one vmovups each).
// The store is a macro: a 32-byte vector parameter draws GCC's ABI note on
// the baseline ISA, and passing it by reference costs registers in the tiles.
template <typename S>
DSK_INLINE typename Vec<S>::type vload(const S* p) {
  typename Vec<S>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
#define DSK_VSTORE(p, v)                                  \
  do {                                                    \
    const auto dsk_v_ = (v);                              \
    std::memcpy((p), &dsk_v_, sizeof dsk_v_);             \
  } while (0)

// c[r][0, kTile) = init + sum_k a(r, k) * b[k][0, kTile) for r < R, where
// a(r, k) = a[r * a_rs + k * a_ks] (broadcast one element at a time, so any
// layout of a is free) and init is 0, or with `load` c[r][.] itself, times
// scale[.] (per column) when scale is given. Each element is one multiply-add
// chain in k order. R = 6: 12 vector accumulators + 2 of b + 1 broadcast fill
// the 16 AVX2 registers, and a k step is 12 multiply-adds for 8 loads.
template <typename S, int R>
DSK_INLINE void tile(const S* a, int64_t a_rs, int64_t a_ks, const S* b, int64_t ldb, S* c,
                     int64_t ldc, int64_t K, bool load, const S* scale) {
  using V = typename Vec<S>::type;
  constexpr int64_t L = Vec<S>::kLanes;
  V acc[R][2];
  if (load && scale) {
    const V s0 = vload(scale), s1 = vload(scale + L);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = vload(c + r * ldc) * s0;
      acc[r][1] = vload(c + r * ldc + L) * s1;
    }
  } else if (load) {
    for (int r = 0; r < R; ++r) {
      acc[r][0] = vload(c + r * ldc);
      acc[r][1] = vload(c + r * ldc + L);
    }
  } else {
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = vload(b + k * ldb), b1 = vload(b + k * ldb + L);
    for (int r = 0; r < R; ++r) {
      const S x = a[r * a_rs + k * a_ks];
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    DSK_VSTORE(c + r * ldc, acc[r][0]);
    DSK_VSTORE(c + r * ldc + L, acc[r][1]);
  }
}

// The rem < 6 rows left over by the 6-row tiles.
template <typename S, int R = 5>
DSK_INLINE void tile_rest(const S* a, int64_t a_rs, int64_t a_ks, const S* b, int64_t ldb, S* c,
                          int64_t ldc, int64_t K, bool load, const S* scale, int64_t rem) {
  if constexpr (R > 0) {
    if (rem == R) return tile<S, R>(a, a_rs, a_ks, b, ldb, c, ldc, K, load, scale);
    tile_rest<S, R - 1>(a, a_rs, a_ks, b, ldb, c, ldc, K, load, scale, rem);
  }
}

// The kTile columns of c[M][.] (row stride ldc) from b[K][.] (row stride ldb),
// tile by tile; see tile for a(r, k), load and scale.
template <typename S>
DSK_INLINE void strip_product(const S* a, int64_t a_rs, int64_t a_ks, const S* b, int64_t ldb, S* c,
                              int64_t ldc, int64_t M, int64_t K, bool load, const S* scale) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6)
    tile<S, 6>(a + m * a_rs, a_rs, a_ks, b, ldb, c + m * ldc, ldc, K, load, scale);
  tile_rest<S>(a + m * a_rs, a_rs, a_ks, b, ldb, c + m * ldc, ldc, K, load, scale, M - m);
}

// c[M][N] (+)= a(M x K) . b[K][N] (row strides ldc, ldb): strips of kTile
// columns through the register tiles, the column tail (odd head dims) scalar;
// `load` adds to c instead of overwriting it. Every element sums in k order.
template <typename S>
DSK_INLINE void product(const S* a, int64_t a_rs, int64_t a_ks, const S* b, int64_t ldb, S* c,
                        int64_t ldc, int64_t M, int64_t N, int64_t K, bool load) {
  constexpr int64_t W = Vec<S>::kTile;
  const int64_t n_vec = N / W * W;
  for (int64_t n0 = 0; n0 < n_vec; n0 += W)
    strip_product(a, a_rs, a_ks, b + n0, ldb, c + n0, ldc, M, K, load,
                  static_cast<const S*>(nullptr));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n_vec; n < N; ++n) {
      S v = load ? c[m * ldc + n] : S(0);
      for (int64_t k = 0; k < K; ++k) v += a[m * a_rs + k * a_ks] * b[k * ldb + n];
      c[m * ldc + n] = v;
    }
}

// ---------------------------------------------------------------------------
// Shared by both passes.
// ---------------------------------------------------------------------------

// x = 2^x element-wise for x <= 127 (the callers exponentiate differences to
// a running max or to the log-sum-exp, so x <= 0 give or take rounding).
// x = n + f with n = rint(x) (the 1.5 * 2^23 trick) and |f| <= 1/2; 2^f by its
// degree-7 Taylor polynomial (truncation < 1e-8 relative), 2^n through the
// exponent bits; x < -127 (and -inf) gives 0, and NaN stays NaN (a NaN
// score must reach the output, not become a zero weight).
DSK_INLINE void exp2_vec(Vec<float>::type& x) {
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(32)));
  typedef uint32_t VU __attribute__((vector_size(32)));
  const V lo = V{} - 127.f, round = V{} + 12582912.f;
  const V v = x < lo ? lo : x;
  const V r = (v + round) - round;
  const V f = v - r;
  V p = V{} + 1.525273380405984e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  // 0 for v = -127: scale 0. Shifted unsigned: a NaN converts to a negative int.
  const VU e = __builtin_convertvector(__builtin_convertvector(r, VI) + 127, VU) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof scale);
  x = p * scale;
}

// Sets s[j][i] (row stride ld) to -inf where query i0 + i does not see key
// j0 + j, for i < nq; returns whether any of them sees any key of the block.
template <typename S>
bool mask_scores_t(const AttnParams& p, int64_t b, const SeqRange& r, int64_t i0, int64_t nq,
                   int64_t j0, int64_t nk, S* s, int64_t ld) {
  const bool* pad = p.key_padding_mask ? p.key_padding_mask + b * p.seqlen_k + j0 : nullptr;
  // Nothing hidden: no padding and (if causal) the first query sees the last key.
  if (!pad && (!p.causal || key_limit(p, r, i0) >= j0 + nk)) return true;
  bool any = false;
  for (int64_t j = 0; j < nk; ++j) {
    // Key j0 + j is causally visible to queries i >= j0 + j + q_len - k_len
    // (key_limit solved for i); a padding key to none.
    int64_t first = first_query_seeing(p, r, j0 + j) - i0;
    if (pad && pad[j]) first = nq;
    first = std::clamp<int64_t>(first, 0, nq);
    std::fill(s + j * ld, s + j * ld + first, -std::numeric_limits<S>::infinity());
    any = any || first < nq;
  }
  return any;
}

// Runs fn(item, scratch) for every item in [0, n) on the intra-op threads,
// handing the items out one at a time from a shared counter instead of in
// fixed chunks: causal and varlen items differ in cost, and a core shared with
// another process falls behind. An item is computed the same way whichever
// thread runs it, so results do not depend on the schedule.
template <typename Scratch, typename Fn>
void parallel_items(int64_t n, const AttnParams& p, const Fn& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Scratch w(p);
    for (int64_t item = next.fetch_add(1, std::memory_order_relaxed); item < n;
         item = next.fetch_add(1, std::memory_order_relaxed))
      fn(item, w);
  });
}

// ---------------------------------------------------------------------------
// Forward, with the queries along the vector lanes.
//
// A work item is up to kFwdBlockQ queries of one (sample, head), kept as strips
// of W = kTile queries (one register tile wide), each strip transposed:
// qt[D][W] holds the queries (scaled by softmax_scale * log2(e)) as columns.
// For each block of nk <= kFwdBlockK keys, strip by strip:
//   s[nk][W]  = K_blk . qt               scores, a row per key
//   s         = online softmax step       down the columns (s becomes p)
//   ot[D][W]  = ot * alpha + V_blk^T . s  the strip's unnormalised output
// Both products broadcast their left operand one element at a time straight
// from K's or V's rows as stored, so fp32 K and V are read in place: no tile
// is transposed or copied. Every softmax step (max, exp, sum, rescale) is an
// element-wise vector op across queries, so there are no horizontal
// reductions, and each query's sums run over keys (and head dims) in a fixed
// order whatever the tiling. A strip's s (4 KiB) stays in L1 from its scores
// to its P.V; the strips of an item share the K and V blocks.
// ---------------------------------------------------------------------------

constexpr int64_t kFwdBlockQ = 128;
constexpr int64_t kFwdBlockK = 64;
constexpr int64_t kFwdRowQ = 6;  // shorter query blocks go one query at a time (fwd_rows)

// Whether the forward scored query i of a sample of q_len queries in fwd_rows
// (its last block, when that has fewer than kFwdRowQ queries): the backward
// then recomputes that query's scores the same way (dot_lanes), so that its
// probabilities match the saved lse bit for bit in the scores.
inline bool scored_by_rows(int64_t q_len, int64_t i) {
  const int64_t tail = q_len % kFwdBlockQ;
  return tail > 0 && tail < kFwdRowQ && i >= q_len - tail;
}
static_assert(kFwdBlockQ % Vec<float>::kTile == 0 && kFwdBlockQ % Vec<double>::kTile == 0,
              "a query block is whole strips");

// A query's output scale and lse (natural log) from its running sum l and max
// m (base 2). A query that saw no key (l = 0) gets 0 and -inf; one whose
// scores held a NaN or +inf has l = NaN (2^NaN, or 2^(inf - inf)) and gets NaN
// for both.
template <typename S>
DSK_INLINE S row_inverse(S l) { return l == S(0) ? S(0) : S(1) / l; }
template <typename S>
DSK_INLINE S row_lse(S l, S m) {
  return l == S(0) ? -std::numeric_limits<S>::infinity() : (m + std::log2(l)) * static_cast<S>(kLn2);
}

// One online-softmax step of a strip: scores s[nk][kTile] to probabilities.
// Per column, with bm the max over the block: m' = max(m, bm);
// alpha = 2^(m - m'); s = 2^(s - m'); l = l * alpha + (sum of s down the
// column, in key order); m = m'. A column that has seen no key yet keeps
// m' = -inf and is shifted by 0 instead (-inf - -inf would be NaN): its s and
// alpha come out 0, which leaves its l and output 0.
template <typename S>
DSK_INLINE void softmax_step(S* s, int64_t nk, S* m, S* l, S* alpha) {
  constexpr S inf = std::numeric_limits<S>::infinity();
  constexpr int64_t W = Vec<S>::kTile;
  if constexpr (std::is_same_v<S, float>) {
    using V = Vec<float>::type;
    constexpr int64_t L = Vec<float>::kLanes;
    const V neg_inf = V{} - inf;
    V bm[2] = {neg_inf, neg_inf}, shift[2], sum[2] = {V{}, V{}}, a[2];
    for (int64_t j = 0; j < nk; ++j)
      for (int h = 0; h < 2; ++h) {
        const V x = vload(s + j * W + h * L);
        bm[h] = x > bm[h] ? x : bm[h];
      }
    for (int h = 0; h < 2; ++h) {
      const V m_old = vload(m + h * L);
      const V m_new = bm[h] > m_old ? bm[h] : m_old;
      shift[h] = m_new == neg_inf ? V{} : m_new;
      a[h] = m_old - shift[h];
      exp2_vec(a[h]);
      DSK_VSTORE(alpha + h * L, a[h]);
      DSK_VSTORE(m + h * L, m_new);
    }
    for (int64_t j = 0; j < nk; ++j)
      for (int h = 0; h < 2; ++h) {
        V x = vload(s + j * W + h * L) - shift[h];
        exp2_vec(x);
        DSK_VSTORE(s + j * W + h * L, x);
        sum[h] += x;
      }
    for (int h = 0; h < 2; ++h) DSK_VSTORE(l + h * L, vload(l + h * L) * a[h] + sum[h]);
  } else {  // fp64 (gradcheck): plain loops and std::exp2
    for (int64_t c = 0; c < W; ++c) {
      S bm = -inf;
      for (int64_t j = 0; j < nk; ++j) bm = std::max(bm, s[j * W + c]);
      const S m_new = std::max(m[c], bm), shift = m_new == -inf ? S(0) : m_new;
      S sum = 0;
      for (int64_t j = 0; j < nk; ++j) {
        S& x = s[j * W + c];
        x = std::exp2(x - shift);
        sum += x;
      }
      alpha[c] = std::exp2(m[c] - shift);
      l[c] = l[c] * alpha[c] + sum;
      m[c] = m_new;
    }
  }
}

// Per-thread buffers of the forward: qt[strip][D][W], ot[strip][D][W], the
// running max / sum / rescale factor of each query, one strip's s, and K and
// V blocks converted to S (unused when T is S).
template <typename S>
struct FwdScratch {
  std::vector<S> qt, ot, m, l, alpha, s, kbuf, vbuf;
  explicit FwdScratch(const AttnParams& p)
      : qt(p.D * kFwdBlockQ), ot(p.D * kFwdBlockQ), m(kFwdBlockQ), l(kFwdBlockQ), alpha(kFwdBlockQ),
        s(kFwdBlockK * Vec<S>::kTile), kbuf(kFwdBlockK * p.D), vbuf(kFwdBlockK * p.D) {}
};

// Queries [i0, i0 + nq) of (sample b, head h): every key block, then out and lse.
template <typename T, typename S>
DSK_CPU_CLONES DSK_CPU_FMA void fwd_block(const AttnParams& p, int64_t b, int64_t h, int64_t i0,
                                          int64_t nq, FwdScratch<S>& w) {
  constexpr int64_t W = Vec<S>::kTile;
  constexpr S inf = std::numeric_limits<S>::infinity();
  const int64_t D = p.D, hk = h / (p.Hq / p.Hkv);
  const int64_t q_stride = p.Hq * D, k_stride = p.Hkv * D;
  const int64_t strips = (nq + W - 1) / W;
  const SeqRange r = seq_range(p, b);
  S *qt = w.qt.data(), *ot = w.ot.data(), *s = w.s.data();
  S *m = w.m.data(), *l = w.l.data(), *alpha = w.alpha.data();

  // Query i is column i % W of strip i / W; the columns past nq are zero
  // queries, computed and dropped.
  const int64_t qoff = ((r.q_start + i0) * p.Hq + h) * D;
  load_strips(static_cast<const T*>(p.q) + qoff, q_stride, nq, D, W,
              static_cast<S>(p.softmax_scale * kLog2e), qt);
  std::fill(ot, ot + strips * D * W, S(0));
  std::fill(m, m + strips * W, -inf);
  std::fill(l, l + strips * W, S(0));

  const int64_t kend = key_limit(p, r, i0 + nq - 1);
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdBlockK) {
    const int64_t nk = std::min(kFwdBlockK, kend - j0);
    const int64_t koff = ((r.k_start + j0) * p.Hkv + hk) * D;
    // The block's K and V rows as S, row stride kv_stride.
    const KvRows<S> kv = kv_rows<T>(p, koff, k_stride, nk, w.kbuf.data(), w.vbuf.data());
    const S *kr = kv.k, *vr = kv.v;
    const int64_t kv_stride = kv.stride;
    for (int64_t st = 0; st < strips; ++st) {
      const int64_t c0 = st * W;
      // s[j][:] = sum_c K[j][c] * qt[c][:]
      strip_product(kr, kv_stride, int64_t(1), qt + st * D * W, W, s, W, nk, D, false,
                    static_cast<const S*>(nullptr));
      // A strip that sees nothing of the block is left as it is (the same as
      // p = 0 and alpha = 1).
      if (!mask_scores_t(p, b, r, i0 + c0, std::min(W, nq - c0), j0, nk, s, W)) continue;
      softmax_step(s, nk, m + c0, l + c0, alpha + c0);
      // ot[c][:] = ot[c][:] * alpha[:] + sum_j V[j][c] * s[j][:]
      strip_product(vr, int64_t(1), kv_stride, s, W, ot + st * D * W, W, D, nk, true,
                    static_cast<const S*>(alpha + c0));
    }
  }

  T* out = static_cast<T*>(p.out) + qoff;
  S* lse = static_cast<S*>(p.lse);
  for (int64_t i = 0; i < nq; ++i) {
    const S inv = row_inverse(l[i]);
    const S* col = ot + (i / W) * D * W + i % W;
    for (int64_t c = 0; c < D; ++c) out[i * q_stride + c] = static_cast<T>(col[c * W] * inv);
    lse[lse_offset(p, b, h, r, i0 + i)] = row_lse(l[i], m[i]);
  }
}

// <x, y> over D elements: a vector of products along D, the tail added to
// the first lanes in order, then the lanes summed pairwise (a fixed order).
template <typename S>
DSK_INLINE S dot_lanes(const S* x, const S* y, int64_t D) {
  constexpr int64_t L = Vec<S>::kLanes;
  typename Vec<S>::type acc{};
  int64_t c = 0;
  for (; c + L <= D; c += L) acc += vload(x + c) * vload(y + c);
  S part[L];
  std::memcpy(part, &acc, sizeof part);
  for (int64_t t = 0; c + t < D; ++t) part[t] += x[c + t] * y[c + t];
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t t = 0; t < w; ++t) part[t] += part[t + w];
  return part[0];
}

// o[0, D) += sum_{j < nk} p[j] * v[j][0, D) (rows of v at stride ld), j in
// order; 8 vectors of o stay in registers across the keys.
template <typename S>
DSK_INLINE void row_accumulate(const S* pj, int64_t nk, const S* v, int64_t ld, S* o, int64_t D) {
  using V = typename Vec<S>::type;
  constexpr int64_t L = Vec<S>::kLanes, kVecs = 8;
  int64_t c0 = 0;
  for (; c0 + kVecs * L <= D; c0 += kVecs * L) {
    V acc[kVecs];
    for (int64_t t = 0; t < kVecs; ++t) acc[t] = vload(o + c0 + t * L);
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t t = 0; t < kVecs; ++t) acc[t] += pj[j] * vload(v + j * ld + c0 + t * L);
    for (int64_t t = 0; t < kVecs; ++t) DSK_VSTORE(o + c0 + t * L, acc[t]);
  }
  for (; c0 + L <= D; c0 += L) {
    V acc = vload(o + c0);
    for (int64_t j = 0; j < nk; ++j) acc += pj[j] * vload(v + j * ld + c0);
    DSK_VSTORE(o + c0, acc);
  }
  for (; c0 < D; ++c0) {
    S acc = o[c0];
    for (int64_t j = 0; j < nk; ++j) acc += pj[j] * v[j * ld + c0];
    o[c0] = acc;
  }
}

// s[0, nk) = 2^(s - shift) (s <= shift); returns their sum, in a fixed order.
template <typename S>
DSK_INLINE S exp2_sum(S* s, int64_t nk, S shift) {
  if constexpr (std::is_same_v<S, float>) {
    using V = Vec<float>::type;
    constexpr int64_t L = Vec<float>::kLanes;
    // Pad to whole vectors with -inf (2^-inf = 0); s has room (kFwdBlockK * kTile).
    std::fill(s + nk, s + (nk + L - 1) / L * L, -std::numeric_limits<float>::infinity());
    V sum{};
    for (int64_t j = 0; j < nk; j += L) {
      V x = vload(s + j) - shift;
      exp2_vec(x);
      DSK_VSTORE(s + j, x);
      sum += x;
    }
    float part[L];
    std::memcpy(part, &sum, sizeof part);
    for (int64_t w = L / 2; w >= 1; w /= 2)
      for (int64_t t = 0; t < w; ++t) part[t] += part[t + w];
    return part[0];
  } else {
    S sum = 0;
    for (int64_t j = 0; j < nk; ++j) sum += (s[j] = std::exp2(s[j] - shift));
    return sum;
  }
}

// The forward of a block of fewer than kFwdRowQ queries (decoding: Lq = 1),
// where a strip would be mostly padding: one query at a time, with the head
// dims along the lanes (scores as dot products, P.V as row updates of o) and
// the same online softmax per key block. qt holds the queries as rows here,
// ot the outputs; s one query's scores.
template <typename T, typename S>
DSK_CPU_CLONES DSK_CPU_FMA void fwd_rows(const AttnParams& p, int64_t b, int64_t h, int64_t i0,
                                         int64_t nq, FwdScratch<S>& w) {
  constexpr S inf = std::numeric_limits<S>::infinity();
  const int64_t D = p.D, hk = h / (p.Hq / p.Hkv);
  const int64_t q_stride = p.Hq * D, k_stride = p.Hkv * D;
  const SeqRange r = seq_range(p, b);
  S *qs = w.qt.data(), *o = w.ot.data(), *s = w.s.data(), *m = w.m.data(), *l = w.l.data();

  const int64_t qoff = ((r.q_start + i0) * p.Hq + h) * D;
  const T* q = static_cast<const T*>(p.q) + qoff;
  const S scale2 = static_cast<S>(p.softmax_scale * kLog2e);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t c = 0; c < D; ++c) qs[i * D + c] = static_cast<S>(q[i * q_stride + c]) * scale2;
  std::fill(o, o + nq * D, S(0));
  std::fill(m, m + nq, -inf);
  std::fill(l, l + nq, S(0));
  const bool* pad = p.key_padding_mask ? p.key_padding_mask + b * p.seqlen_k : nullptr;

  const int64_t kend = key_limit(p, r, i0 + nq - 1);
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdBlockK) {
    const int64_t nk = std::min(kFwdBlockK, kend - j0);
    const int64_t koff = ((r.k_start + j0) * p.Hkv + hk) * D;
    // The block's K and V rows as S, row stride kv_stride.
    const KvRows<S> kv = kv_rows<T>(p, koff, k_stride, nk, w.kbuf.data(), w.vbuf.data());
    const S *kr = kv.k, *vr = kv.v;
    const int64_t kv_stride = kv.stride;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t lim = key_limit(p, r, i0 + i) - j0;  // keys j < lim causally visible
      S bm = -inf;
      bool nan = false;  // max skips NaN scores; they must still reach l and o
      for (int64_t j = 0; j < nk; ++j) {
        const bool visible = j < lim && !(pad && pad[j0 + j]);
        s[j] = visible ? dot_lanes(qs + i * D, kr + j * kv_stride, D) : -inf;
        bm = std::max(bm, s[j]);
        nan = nan || s[j] != s[j];
      }
      if (bm == -inf && !nan) continue;  // sees nothing of the block: p = 0, alpha = 1
      const S m_new = std::max(m[i], bm);
      const S alpha = std::exp2(m[i] - m_new);  // 0 for the first visible block
      l[i] = l[i] * alpha + exp2_sum(s, nk, m_new);
      m[i] = m_new;
      S* oi = o + i * D;
      for (int64_t c = 0; c < D; ++c) oi[c] *= alpha;
      row_accumulate(s, nk, vr, kv_stride, oi, D);
    }
  }

  T* out = static_cast<T*>(p.out) + qoff;
  S* lse = static_cast<S*>(p.lse);
  for (int64_t i = 0; i < nq; ++i) {
    const S inv = row_inverse(l[i]);
    for (int64_t c = 0; c < D; ++c) out[i * q_stride + c] = static_cast<T>(o[i * D + c] * inv);
    lse[lse_offset(p, b, h, r, i0 + i)] = row_lse(l[i], m[i]);
  }
}

template <typename T>
void fwd(const AttnParams& p) {
  using S = typename ComputeOf<T>::type;
  const int64_t nqb = (p.seqlen_q + kFwdBlockQ - 1) / kFwdBlockQ;
  parallel_items<FwdScratch<S>>(p.B * p.Hq * nqb, p, [&](int64_t item, FwdScratch<S>& w) {
    const int64_t qb = item % nqb, h = (item / nqb) % p.Hq, b = item / (nqb * p.Hq);
    const int64_t i0 = qb * kFwdBlockQ, q_len = seq_range(p, b).q_len;
    const int64_t nq = std::min(kFwdBlockQ, q_len - i0);
    if (nq > 0 && scored_by_rows(q_len, i0))
      fwd_rows<T, S>(p, b, h, i0, nq, w);
    else if (nq > 0)
      fwd_block<T, S>(p, b, h, i0, nq, w);
  });
}

// ---------------------------------------------------------------------------
// Backward, with the queries along the vector lanes.
//
// A work item is one (sample b, kv head hk, chunk of keys): those keys and
// every query of the query heads that read hk. Per query head, block of up to
// kBwdBlockQ queries (strips of W as in the forward: qt = q^T scaled by
// softmax_scale * log2(e), dot = dout^T) and block of nk <= kBwdBlockK keys:
//   P[nk][.]  = 2^(K_blk . qt - lse2)        strip by strip, 0 where hidden
//   DS[nk][.] = P * (V_blk . dot - delta) * softmax_scale
//                                            (delta_i = <dout_i, out_i>)
//   dqt      += K_blk^T . DS                 the strip's dq, transposed
//   dv[keys] += P . dout,  dk[keys] += DS . q   over the block's queries
// Five products per pair of blocks and no recomputation. dk and dv of the
// item's keys (rows no other item writes) accumulate over the query heads
// and blocks, in order, in the output rows themselves (fp32, fp64) or in
// fp32 scratch (bf16, fp16). With one chunk (the keys of the sample), dq of
// a query block is complete once its keys are done and is written at once;
// when B * Hkv is too small to keep the cores busy, the keys are split into
// chunks, each adds its part of dq into an fp32 copy of its own, and the
// copies are summed in chunk order at the end. The chunk count depends on
// the shapes only.
// ---------------------------------------------------------------------------

constexpr int64_t kBwdBlockQ = 64;
constexpr int64_t kBwdBlockK = 64;
constexpr int64_t kBwdMinItems = 16;  // split the keys while B * Hkv is below this
static_assert(kBwdBlockQ % Vec<float>::kTile == 0 && kBwdBlockQ % Vec<double>::kTile == 0,
              "a query block is whole strips");

// <a, b> over D elements through 8 interleaved lanes (element c goes to lane
// c % 8, lanes combined pairwise): a fixed order, and vectorizable.
template <typename T, typename S>
S row_dot(const T* a, const T* b, int64_t D) {
  S part[8] = {};
  int64_t c = 0;
  for (; c + 8 <= D; c += 8)
    for (int l = 0; l < 8; ++l) part[l] += static_cast<S>(a[c + l]) * static_cast<S>(b[c + l]);
  for (int l = 0; c + l < D; ++l) part[l] += static_cast<S>(a[c + l]) * static_cast<S>(b[c + l]);
  for (int w = 4; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

// For one strip (row stride ld): P = 2^(s - shift) and
// DS = P * (DS - delta) * scale, per column (softmax_scale folded in here
// serves both dq and dk). shift is lse2 (never -inf: see bwd_block), so a
// hidden score (-inf) gives P = 0 exactly and so DS = 0.
template <typename S>
DSK_INLINE void grad_step(S* P, S* DS, int64_t ld, int64_t nk, const S* shift, const S* delta,
                          S scale) {
  if constexpr (std::is_same_v<S, float>) {
    using V = Vec<float>::type;
    constexpr int64_t L = Vec<float>::kLanes;
    const V hi = V{} + 127.f;  // exp2_vec's range, whatever lse the caller passed
    for (int h = 0; h < 2; ++h) {
      const V sh = vload(shift + h * L), dl = vload(delta + h * L);
      for (int64_t j = 0; j < nk; ++j) {
        V x = vload(P + j * ld + h * L) - sh;
        x = x > hi ? hi : x;  // NaN passes
        exp2_vec(x);
        DSK_VSTORE(P + j * ld + h * L, x);
        DSK_VSTORE(DS + j * ld + h * L, x * ((vload(DS + j * ld + h * L) - dl) * scale));
      }
    }
  } else {  // fp64 (gradcheck): plain loops and std::exp2
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t c = 0; c < Vec<S>::kTile; ++c) {
        const S x = std::exp2(P[j * ld + c] - shift[c]);
        P[j * ld + c] = x;
        DS[j * ld + c] = x * ((DS[j * ld + c] - delta[c]) * scale);
      }
  }
}

// Per-thread buffers of the backward: a query block's strips (qt, dot, dqt)
// and per-column shift and delta, its q and dout rows as S (unused when T is
// S), P and DS of a block pair (row stride kBwdBlockQ), a K and V block as S,
// dk, dv of the item's keys as S (unused when T is S: the outputs
// themselves accumulate), and one query row (scored_by_rows queries).
template <typename T, typename S>
struct BwdScratch {
  static constexpr bool kConvert = !std::is_same_v<T, S>;
  std::vector<S> qt, dot, dqt, shift, delta, qrows, drows, P, DS, kbuf, vbuf, dk, dv, qrow;
  explicit BwdScratch(const AttnParams& p)
      : qt(kBwdBlockQ * p.D), dot(kBwdBlockQ * p.D), dqt(kBwdBlockQ * p.D), shift(kBwdBlockQ),
        delta(kBwdBlockQ), qrows(kConvert ? kBwdBlockQ * p.D : 0),
        drows(kConvert ? kBwdBlockQ * p.D : 0), P(kBwdBlockK * kBwdBlockQ),
        DS(kBwdBlockK * kBwdBlockQ), kbuf(kConvert ? kBwdBlockK * p.D : 0),
        vbuf(kConvert ? kBwdBlockK * p.D : 0), dk(kConvert ? p.seqlen_k * p.D : 0),
        dv(kConvert ? p.seqlen_k * p.D : 0), qrow(p.D) {}
};

// Queries [i0, i0 + nq) of (sample b, head h) against the keys in
// [k_lo, k_hi) they see: adds to dk and dv (key k_lo + j at row j, row
// stride ld_kv) and writes their dq (as T), or their part of it to dq_part
// (as S).
template <typename T, typename S>
DSK_CPU_CLONES DSK_CPU_FMA void bwd_block(const AttnParams& p, int64_t b, int64_t h, int64_t i0,
                                          int64_t nq, int64_t k_lo, int64_t k_hi, S* dk, S* dv,
                                          int64_t ld_kv, S* dq_part, BwdScratch<T, S>& w) {
  constexpr int64_t W = Vec<S>::kTile, ldp = kBwdBlockQ;
  constexpr S inf = std::numeric_limits<S>::infinity();
  const int64_t D = p.D, hk = h / (p.Hq / p.Hkv);
  const int64_t q_stride = p.Hq * D, k_stride = p.Hkv * D;
  const int64_t strips = (nq + W - 1) / W;
  const SeqRange r = seq_range(p, b);
  S *qt = w.qt.data(), *dot = w.dot.data(), *dqt = w.dqt.data(), *P = w.P.data(), *DS = w.DS.data();
  S *shift = w.shift.data(), *delta = w.delta.data();

  const int64_t kend = std::min(k_hi, key_limit(p, r, i0 + nq - 1));
  if (dq_part && kend <= k_lo) return;  // no key here: its part of dq stays 0

  const int64_t qoff = ((r.q_start + i0) * p.Hq + h) * D;
  const T* q = static_cast<const T*>(p.q) + qoff;
  const T* dout = static_cast<const T*>(p.dout) + qoff;
  const T* out = static_cast<const T*>(p.out) + qoff;
  const S* lse = static_cast<const S*>(p.lse);
  load_strips(q, q_stride, nq, D, W, static_cast<S>(p.softmax_scale * kLog2e), qt);
  load_strips(dout, q_stride, nq, D, W, S(1), dot);
  std::fill(dqt, dqt + strips * D * W, S(0));
  // A query that sees no key has lse = -inf: shifted by 0 instead, its scores
  // (all hidden, -inf) still give P = 0. The padding columns get P = 0 from
  // shift = +inf, and DS = 0 from delta = 0 and dot = 0.
  for (int64_t i = 0; i < strips * W; ++i) {
    if (i < nq) {
      const S l2 = lse[lse_offset(p, b, h, r, i0 + i)] * static_cast<S>(kLog2e);
      shift[i] = l2 == -inf ? S(0) : l2;
      delta[i] = row_dot<T, S>(dout + i * q_stride, out + i * q_stride, D);
    } else {
      shift[i] = inf;
      delta[i] = S(0);
    }
  }
  // q and dout rows as S, the right operands of dk and dv.
  const S *qr, *dr;
  int64_t row_stride;
  if constexpr (std::is_same_v<T, S>) {
    qr = q, dr = dout, row_stride = q_stride;
  } else {
    load_rows(q, q_stride, nq, D, w.qrows.data());
    load_rows(dout, q_stride, nq, D, w.drows.data());
    qr = w.qrows.data(), dr = w.drows.data(), row_stride = D;
  }

  for (int64_t j0 = k_lo; j0 < kend; j0 += kBwdBlockK) {
    const int64_t nk = std::min(kBwdBlockK, kend - j0);
    const int64_t koff = ((r.k_start + j0) * p.Hkv + hk) * D;
    // The block's K and V rows as S, row stride kv_stride.
    const KvRows<S> kv = kv_rows<T>(p, koff, k_stride, nk, w.kbuf.data(), w.vbuf.data());
    const S *kr = kv.k, *vr = kv.v;
    const int64_t kv_stride = kv.stride;
    S *dk_rows = dk + (j0 - k_lo) * ld_kv, *dv_rows = dv + (j0 - k_lo) * ld_kv;
    // Causally, the block's first key is seen from query j0 + q_len - k_len
    // on (key_limit solved for i): the strips before see nothing of it.
    const int64_t first = p.causal ? std::max<int64_t>(0, j0 + r.q_len - r.k_len - i0) / W : 0;
    for (int64_t st = first; st < strips; ++st) {
      const int64_t c0 = st * W;
      S *Ps = P + c0, *DSs = DS + c0, *dqs = dqt + st * D * W;
      // Ps[j][:] = sum_c K[j][c] * qt[c][:], -inf where hidden
      strip_product(kr, kv_stride, int64_t(1), qt + st * D * W, W, Ps, ldp, nk, D, false,
                    static_cast<const S*>(nullptr));
      // The queries the forward scored one at a time: their scores as it computed
      // them (a differently rounded score put their gradients off the saved lse
      // by up to ~1e-3 relative at large scores).
      for (int64_t c = c0; c < std::min(c0 + W, nq); ++c) {
        if (!scored_by_rows(r.q_len, i0 + c)) continue;
        S* row = w.qrow.data();
        for (int64_t d = 0; d < D; ++d) row[d] = qt[st * D * W + d * W + (c - c0)];
        for (int64_t j = 0; j < nk; ++j) Ps[j * ldp + (c - c0)] = dot_lanes(row, kr + j * kv_stride, D);
      }
      mask_scores_t(p, b, r, i0 + c0, std::min(W, nq - c0), j0, nk, Ps, ldp);
      // DSs[j][:] = sum_c V[j][c] * dot[c][:]
      strip_product(vr, kv_stride, int64_t(1), dot + st * D * W, W, DSs, ldp, nk, D, false,
                    static_cast<const S*>(nullptr));
      grad_step(Ps, DSs, ldp, nk, shift + c0, delta + c0, static_cast<S>(p.softmax_scale));
      // dqs[c][:] += sum_j K[j][c] * DSs[j][:]
      strip_product(kr, int64_t(1), kv_stride, DSs, ldp, dqs, W, D, nk, true,
                    static_cast<const S*>(nullptr));
    }
    // dv[j][:] += sum_i P[j][i] * dout[i][:] and dk[j][:] += sum_i DS[j][i] * q[i][:]
    // over the queries from the first strip on.
    const int64_t c0 = first * W;
    product(P + c0, ldp, int64_t(1), dr + c0 * row_stride, row_stride, dv_rows, ld_kv, nk, D,
            nq - c0, true);
    product(DS + c0, ldp, int64_t(1), qr + c0 * row_stride, row_stride, dk_rows, ld_kv, nk, D,
            nq - c0, true);
  }
  if (dq_part)
    store_strips(dqt, nq, D, W, S(1), dq_part + qoff, q_stride);
  else
    store_strips(dqt, nq, D, W, S(1), static_cast<T*>(p.dq) + qoff, q_stride);
}

template <typename T>
void bwd(const AttnParams& p) {
  using S = typename ComputeOf<T>::type;
  const int64_t group = p.Hq / p.Hkv, D = p.D, q_stride = p.Hq * D, k_stride = p.Hkv * D;
  // Key chunks: whole key blocks, as many as B * Hkv needs to reach
  // kBwdMinItems items (one chunk, the whole sample, from there on).
  const int64_t key_blocks = std::max<int64_t>((p.seqlen_k + kBwdBlockK - 1) / kBwdBlockK, 1);
  const int64_t bh = std::max<int64_t>(p.B * p.Hkv, 1);
  const int64_t want = std::clamp<int64_t>((kBwdMinItems + bh - 1) / bh, 1, key_blocks);
  const int64_t chunk = (key_blocks + want - 1) / want * kBwdBlockK;  // keys per chunk
  const int64_t chunks = std::max<int64_t>((p.seqlen_k + chunk - 1) / chunk, 1);
  const int64_t q_numel = (p.cu_seqlens_q ? p.total_q : p.B * p.seqlen_q) * q_stride;
  std::vector<S> dq_part(chunks > 1 ? chunks * q_numel : 0);

  parallel_items<BwdScratch<T, S>>(p.B * p.Hkv * chunks, p, [&](int64_t item, BwdScratch<T, S>& w) {
    const int64_t kc = item % chunks, hk = (item / chunks) % p.Hkv, b = item / (chunks * p.Hkv);
    const SeqRange r = seq_range(p, b);
    const int64_t k_lo = kc * chunk, k_hi = std::min(r.k_len, k_lo + chunk);
    if (chunks > 1 && k_lo >= k_hi) return;
    S* part = chunks > 1 ? dq_part.data() + kc * q_numel : nullptr;
    // dk and dv accumulate in the outputs when they are S, else in scratch.
    const int64_t koff = ((r.k_start + k_lo) * p.Hkv + hk) * D;
    T* dk = static_cast<T*>(p.dk) + koff;
    T* dv = static_cast<T*>(p.dv) + koff;
    S *dk_acc, *dv_acc;
    int64_t ld_kv;
    if constexpr (std::is_same_v<T, S>) {
      dk_acc = dk, dv_acc = dv, ld_kv = k_stride;
    } else {
      dk_acc = w.dk.data(), dv_acc = w.dv.data(), ld_kv = D;
    }
    for (int64_t j = 0; j < k_hi - k_lo; ++j) {
      std::fill(dk_acc + j * ld_kv, dk_acc + j * ld_kv + D, S(0));
      std::fill(dv_acc + j * ld_kv, dv_acc + j * ld_kv + D, S(0));
    }
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
      for (int64_t i0 = 0; i0 < r.q_len; i0 += kBwdBlockQ)
        bwd_block<T, S>(p, b, h, i0, std::min(kBwdBlockQ, r.q_len - i0), k_lo, k_hi, dk_acc, dv_acc,
                        ld_kv, part, w);
    if constexpr (!std::is_same_v<T, S>) {
      for (int64_t j = 0; j < k_hi - k_lo; ++j)
        for (int64_t c = 0; c < D; ++c) {
          dk[j * k_stride + c] = static_cast<T>(dk_acc[j * D + c]);
          dv[j * k_stride + c] = static_cast<T>(dv_acc[j * D + c]);
        }
    }
  });

  if (chunks > 1) {  // dq = the sum of the chunks' parts, in chunk order
    T* dq = static_cast<T*>(p.dq);
    at::parallel_for(0, q_numel, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t x = begin; x < end; ++x) {
        S sum = dq_part[x];
        for (int64_t kc = 1; kc < chunks; ++kc) sum += dq_part[kc * q_numel + x];
        dq[x] = static_cast<T>(sum);
      }
    });
  }
}

// Varlen: seqlen_q/k become the samples' longest runs. The caller's max_seqlen_q/k
// only bound them (and may overstate them): work items and scratch follow the data.
AttnParams tight_lengths(AttnParams p) {
  if (p.cu_seqlens_q == nullptr) return p;
  int64_t longest_q = 0, longest_k = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    const SeqRange r = seq_range(p, b);
    longest_q = std::max(longest_q, r.q_len);
    longest_k = std::max(longest_k, r.k_len);
  }
  p.seqlen_q = longest_q;
  p.seqlen_k = longest_k;
  return p;
}

template <template <typename> class F>
void dispatch(const AttnParams& params) {
  const AttnParams p = tight_lengths(params);
  switch (p.dtype) {
    case DType::kFloat32: F<float>::run(p); break;
    case DType::kFloat16: F<c10::Half>::run(p); break;
    case DType::kBFloat16: F<c10::BFloat16>::run(p); break;
    case DType::kFloat64: F<double>::run(p); break;
  }
}

template <typename T> struct Fwd { static void run(const AttnParams& p) { fwd<T>(p); } };
template <typename T> struct Bwd { static void run(const AttnParams& p) { bwd<T>(p); } };

}  // namespace

void attention_fwd_cpu(const AttnParams& p) { dispatch<Fwd>(p); }
void attention_bwd_cpu(const AttnParams& p) { dispatch<Bwd>(p); }

}  // namespace dsk::attention
