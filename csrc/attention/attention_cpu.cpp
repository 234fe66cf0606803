// CPU kernels for exact attention (FlashAttention-2's algorithm on CPU).
//
// Forward: one work item per (sample, query head, block of kFwdBlockQ queries),
// handed to threads one at a time. The queries are converted once to the
// compute type (fp32; fp64 for fp64 data) with softmax_scale * log2(e) folded
// in and transposed, so that queries run along the vector lanes; each block of
// kFwdBlockK keys is then scored and folded into a running max / sum / output
// (online softmax in base 2) with element-wise vector ops only (see "Forward,
// with the queries along the vector lanes" below). Nothing of size Lq x Lk is
// ever stored.
//
// Backward: delta_i = <dout_i, out_i> first; then dk/dv with one work item per
// (sample, kv head, key block) that loops over the query heads of its group and
// all query blocks, and dq with one work item per (sample, query head, query
// block) that loops over key blocks. Both recompute p from the saved lse. Every
// sum has a fixed order and each output row has one writer: results do not
// depend on the thread count (deterministic).
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

constexpr int64_t kBlockQ = 128;  // backward tiles (the forward's: kFwdBlockQ/K)
constexpr int64_t kBlockK = 64;
constexpr int64_t kMaxRow = 256;  // head dims the CPU kernels take (attention_api.cpp)
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename T> struct ComputeOf { using type = float; };
template <> struct ComputeOf<double> { using type = double; };

// Keys [0, limit) are causally visible to query i (before the padding mask).
inline int64_t key_limit(const AttnParams& p, const SeqRange& r, int64_t i) {
  if (!p.causal) return r.k_len;
  return std::clamp<int64_t>(i + r.k_len - r.q_len + 1, 0, r.k_len);
}

// n rows of D elements (row stride `stride` elements) -> dst[n][D] * scale.
template <typename T, typename S>
void load_rows(const T* src, int64_t stride, int64_t n, int64_t D, S scale, S* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + r * stride;
    S* d = dst + r * D;
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<S>(s[c]) * scale;
  }
}

// The same rows transposed: dst[c * kBlockK + r]; columns r >= n are zeroed so
// the score kernel can always run the full, fixed kBlockK width.
template <typename T, typename S>
void load_rows_t(const T* src, int64_t stride, int64_t n, int64_t D, S* dst) {
  if (n < kBlockK) std::fill(dst, dst + D * kBlockK, S(0));
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + r * stride;
    for (int64_t c = 0; c < D; ++c) dst[c * kBlockK + r] = static_cast<S>(s[c]);
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

// C[m][n] (+)= sum_k A(m, k) * B[k][n] for m < M, n < N, every element summed in
// k order from its initial value (bitwise the plain triple loop). A(m, k) is at
// a[m * a_rs + k * a_ks] (so a transposed A costs nothing), B and C row-major.
// fp32: register tiles of 4 rows x 16 columns (8 vector accumulators, one
// broadcast and two vector loads per k), the column tail scalar.
template <typename S>
DSK_CPU_CLONES DSK_CPU_FMA void gemm(const S* a, int64_t a_rs, int64_t a_ks, const S* b, int64_t ldb, S* c,
                         int64_t ldc, int64_t M, int64_t N, int64_t K, bool init_zero) {
  constexpr int64_t kRows = 4, kCols = 16;
  int64_t n_vec = 0;
  if constexpr (std::is_same_v<S, float>) {
    typedef float v8 __attribute__((vector_size(32)));
    n_vec = N / kCols * kCols;
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int64_t rows = std::min(kRows, M - m0);
      for (int64_t n0 = 0; n0 < n_vec; n0 += kCols) {
        v8 acc[kRows][2];
        for (int64_t r = 0; r < kRows; ++r)
          for (int h = 0; h < 2; ++h) {
            if (init_zero || r >= rows) {
              acc[r][h] = v8{};
            } else {
              std::memcpy(&acc[r][h], c + (m0 + r) * ldc + n0 + 8 * h, sizeof(v8));
            }
          }
        for (int64_t k = 0; k < K; ++k) {
          v8 b0, b1;
          std::memcpy(&b0, b + k * ldb + n0, sizeof(v8));
          std::memcpy(&b1, b + k * ldb + n0 + 8, sizeof(v8));
          for (int64_t r = 0; r < kRows; ++r) {
            // Rows past M read row 0 again (in bounds) and are never stored.
            const float x = a[(m0 + (r < rows ? r : 0)) * a_rs + k * a_ks];
            acc[r][0] += x * b0;
            acc[r][1] += x * b1;
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int h = 0; h < 2; ++h)
            std::memcpy(c + (m0 + r) * ldc + n0 + 8 * h, &acc[r][h], sizeof(v8));
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    S* cr = c + m * ldc;
    for (int64_t n = n_vec; n < N; ++n) {
      S v = init_zero ? S(0) : cr[n];
      for (int64_t k = 0; k < K; ++k) v += a[m * a_rs + k * a_ks] * b[k * ldb + n];
      cr[n] = v;
    }
  }
}

// Sum of x[0..n) through 8 interleaved lanes (x[j] goes to lane j % 8, lanes
// combined pairwise): a fixed order, so deterministic, and vectorizable (a
// plain sequential sum is a chain of dependent adds).
template <typename S>
DSK_CPU_CLONES S lane_sum(const S* x, int64_t n) {
  S part[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) part[l] += x[j + l];
  for (int l = 0; j + l < n; ++l) part[l] += x[j + l];
  for (int w = 4; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

// out[i][:kBlockK] = q[i] . kt (kt: [D][kBlockK]) for i < n.
template <typename S>
void scores(const S* a, int64_t n, const S* bt, int64_t D, S* out) {
  gemm(a, D, 1, bt, kBlockK, out, kBlockK, n, kBlockK, D, true);
}

// acc[i][:] += sum_{j < nk} c[i][j] * rows[j][:], j in order (P.V, dS.K).
template <typename S>
void accumulate(const S* c, int64_t nq, int64_t nk, const S* rows, int64_t D, S* acc) {
  gemm(c, kBlockK, 1, rows, D, acc, D, nq, D, nk, false);
}

// acc[j][:] += sum_{i < nq} c[i][j] * rows[i][:], i in order (P^T.dO, dS^T.Q).
template <typename S>
void accumulate_t(const S* c, int64_t nq, int64_t nk, const S* rows, int64_t D, S* acc) {
  gemm(c, 1, kBlockK, rows, D, acc, D, nk, D, nq, false);
}

// C++17 (torch < 2.13 builds with it): no std::bit_cast; memcpy compiles to a move.
inline float float_from_bits(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// x[i] = 2^x[i] in place. fp32: x = n + f with n = rint(x) (the 1.5 * 2^23
// trick) and |f| <= 1/2, 2^f by its degree-7 Taylor polynomial (truncation
// < 1e-8 relative), 2^n through the exponent bits; x < -127 (and -inf) gives 0.
// Vectorizes. fp64 (gradcheck only): std::exp2.
DSK_CPU_CLONES DSK_CPU_FMA void exp2_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] < -127.f ? -127.f : x[i];
    v = v > 127.f ? 127.f : v;
    const float r = (v + 12582912.f) - 12582912.f;
    const float f = v - r;
    float p = 1.525273380405984e-05f;
    p = p * f + 1.5403530393381606e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.618129107628477e-03f;
    p = p * f + 5.550410866482158e-02f;
    p = p * f + 2.402265069591007e-01f;
    p = p * f + 6.931471805599453e-01f;
    p = p * f + 1.0f;
    const int32_t e = static_cast<int32_t>(r) + 127;  // 0 for x <= -127: scale 0
    x[i] = p * float_from_bits(e << 23);
  }
}
inline void exp2_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp2(x[i]);
}

// Sets s[i][j] to `hidden` where query i0 + i does not see key j0 + j; returns
// whether any key is visible to any row.
template <typename S>
bool apply_mask(const AttnParams& p, int64_t b, const SeqRange& r, int64_t i0, int64_t nq,
                int64_t j0, int64_t nk, S* s, S hidden) {
  const bool* pad = p.key_padding_mask ? p.key_padding_mask + b * p.seqlen_k + j0 : nullptr;
  // Nothing hidden: no padding and (if causal) the block's first query sees its last key.
  if (!pad && (!p.causal || key_limit(p, r, i0) >= j0 + nk)) return true;
  bool any = false;
  for (int64_t i = 0; i < nq; ++i) {
    S* row = s + i * kBlockK;
    const int64_t lim = key_limit(p, r, i0 + i) - j0;
    for (int64_t j = 0; j < nk; ++j) {
      const bool visible = j < lim && !(pad && pad[j]);
      row[j] = visible ? row[j] : hidden;
      any = any || visible;
    }
  }
  return any;
}

// p[i][j] = exp2(s[i][j] * scale2 - lse2[i]) (0 when the row sees nothing;
// the caller zeroes masked entries afterwards).
template <typename S>
void probs(const S* lse2, int64_t nq, int64_t nk, S scale2, S* s) {
  for (int64_t i = 0; i < nq; ++i) {
    S* row = s + i * kBlockK;
    const S l = lse2[i];
    if (l == -std::numeric_limits<S>::infinity()) {
      for (int64_t j = 0; j < nk; ++j) row[j] = S(0);
      continue;
    }
    for (int64_t j = 0; j < nk; ++j) row[j] = row[j] * scale2 - l;
    exp2_inplace(row, nk);
  }
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
static_assert(kFwdBlockQ % Vec<float>::kTile == 0 && kFwdBlockQ % Vec<double>::kTile == 0,
              "a query block is whole strips");

// Loads and stores through memcpy: no alignment assumed (one vmovups each).
template <typename S>
DSK_INLINE typename Vec<S>::type vload(const S* p) {
  typename Vec<S>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename S>
DSK_INLINE void vstore(S* p, typename Vec<S>::type v) {
  std::memcpy(p, &v, sizeof v);
}

// c[r][0, kTile) = init + sum_k a(r, k) * b[k][0, kTile) for r < R, where
// a(r, k) = a[r * a_rs + k * a_ks] (broadcast one element at a time, so any
// layout of a is free) and init is c[r][.] * scale[.] (per column), or 0 when
// scale is null. Each element is one multiply-add chain in k order. R = 6: 12
// vector accumulators + 2 of b + 1 broadcast fill the 16 AVX2 registers, and a
// k step is 12 multiply-adds for 8 loads.
template <typename S, int R>
DSK_INLINE void tile(const S* a, int64_t a_rs, int64_t a_ks, const S* b, int64_t ldb, S* c,
                     int64_t ldc, int64_t K, const S* scale) {
  using V = typename Vec<S>::type;
  constexpr int64_t L = Vec<S>::kLanes;
  V acc[R][2];
  if (scale) {
    const V s0 = vload(scale), s1 = vload(scale + L);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = vload(c + r * ldc) * s0;
      acc[r][1] = vload(c + r * ldc + L) * s1;
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
    vstore(c + r * ldc, acc[r][0]);
    vstore(c + r * ldc + L, acc[r][1]);
  }
}

// The rem < 6 rows left over by the 6-row tiles.
template <typename S, int R = 5>
DSK_INLINE void tile_rest(const S* a, int64_t a_rs, int64_t a_ks, const S* b, int64_t ldb, S* c,
                          int64_t ldc, int64_t K, const S* scale, int64_t rem) {
  if constexpr (R > 0) {
    if (rem == R) return tile<S, R>(a, a_rs, a_ks, b, ldb, c, ldc, K, scale);
    tile_rest<S, R - 1>(a, a_rs, a_ks, b, ldb, c, ldc, K, scale, rem);
  }
}

// c[M][kTile] (row stride kTile) = init + a(M x K) . b[K][kTile] (row stride
// kTile), tile by tile; see tile for a(r, k) and init.
template <typename S>
DSK_INLINE void strip_product(const S* a, int64_t a_rs, int64_t a_ks, const S* b, S* c,
                              int64_t M, int64_t K, const S* scale) {
  constexpr int64_t W = Vec<S>::kTile;
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) tile<S, 6>(a + m * a_rs, a_rs, a_ks, b, W, c + m * W, W, K, scale);
  tile_rest<S>(a + m * a_rs, a_rs, a_ks, b, W, c + m * W, W, K, scale, M - m);
}

// x = 2^x element-wise for x <= 0: the formula of exp2_inplace(float*), whose
// upper clamp the softmax does not need (it only exponentiates differences to
// the running max); x < -127 and -inf give 0.
DSK_INLINE void exp2_vec(Vec<float>::type& x) {
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(32)));
  const V lo = V{} - 127.f, round = V{} + 12582912.f;
  const V v = x > lo ? x : lo;
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
  const VI e = (__builtin_convertvector(r, VI) + 127) << 23;  // 0 for v = -127: scale 0
  V scale;
  std::memcpy(&scale, &e, sizeof scale);
  x = p * scale;
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
      vstore(alpha + h * L, a[h]);
      vstore(m + h * L, m_new);
    }
    for (int64_t j = 0; j < nk; ++j)
      for (int h = 0; h < 2; ++h) {
        V x = vload(s + j * W + h * L) - shift[h];
        exp2_vec(x);
        vstore(s + j * W + h * L, x);
        sum[h] += x;
      }
    for (int h = 0; h < 2; ++h) vstore(l + h * L, vload(l + h * L) * a[h] + sum[h]);
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
    int64_t first = p.causal ? j0 + j + r.q_len - r.k_len - i0 : 0;
    if (pad && pad[j]) first = nq;
    first = std::clamp<int64_t>(first, 0, nq);
    std::fill(s + j * ld, s + j * ld + first, -std::numeric_limits<S>::infinity());
    any = any || first < nq;
  }
  return any;
}

// Per-thread buffers of the forward: qt[strip][D][W], ot[strip][D][W], the
// running max / sum / rescale factor of each query, one strip's s, and K and
// V blocks converted to S (unused when T is S).
template <typename S>
struct FwdScratch {
  std::vector<S> qt, ot, m, l, alpha, s, kbuf, vbuf;
  explicit FwdScratch(int64_t D)
      : qt(D * kFwdBlockQ), ot(D * kFwdBlockQ), m(kFwdBlockQ), l(kFwdBlockQ), alpha(kFwdBlockQ),
        s(kFwdBlockK * Vec<S>::kTile), kbuf(kFwdBlockK * D), vbuf(kFwdBlockK * D) {}
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
  const T* q = static_cast<const T*>(p.q) + ((r.q_start + i0) * p.Hq + h) * D;
  const S scale2 = static_cast<S>(p.softmax_scale * kLog2e);
  for (int64_t i = 0; i < strips * W; ++i) {
    S* col = qt + (i / W) * D * W + i % W;
    for (int64_t c = 0; c < D; ++c)
      col[c * W] = i < nq ? static_cast<S>(q[i * q_stride + c]) * scale2 : S(0);
  }
  std::fill(ot, ot + strips * D * W, S(0));
  std::fill(m, m + strips * W, -inf);
  std::fill(l, l + strips * W, S(0));

  const int64_t kend = key_limit(p, r, i0 + nq - 1);
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdBlockK) {
    const int64_t nk = std::min(kFwdBlockK, kend - j0);
    const int64_t koff = ((r.k_start + j0) * p.Hkv + hk) * D;
    const T* kb = static_cast<const T*>(p.k) + koff;
    const T* vb = static_cast<const T*>(p.v) + koff;
    // The block's K and V rows as S, row stride kv_stride.
    const S *kr, *vr;
    int64_t kv_stride;
    if constexpr (std::is_same_v<T, S>) {
      kr = kb, vr = vb, kv_stride = k_stride;
    } else {
      load_rows(kb, k_stride, nk, D, S(1), w.kbuf.data());
      load_rows(vb, k_stride, nk, D, S(1), w.vbuf.data());
      kr = w.kbuf.data(), vr = w.vbuf.data(), kv_stride = D;
    }
    for (int64_t st = 0; st < strips; ++st) {
      const int64_t c0 = st * W;
      // s[j][:] = sum_c K[j][c] * qt[c][:]
      strip_product(kr, kv_stride, int64_t(1), qt + st * D * W, s, nk, D, static_cast<const S*>(nullptr));
      // A strip that sees nothing of the block is left as it is (the same as
      // p = 0 and alpha = 1).
      if (!mask_scores_t(p, b, r, i0 + c0, std::min(W, nq - c0), j0, nk, s, W)) continue;
      softmax_step(s, nk, m + c0, l + c0, alpha + c0);
      // ot[c][:] = ot[c][:] * alpha[:] + sum_j V[j][c] * s[j][:]
      strip_product(vr, int64_t(1), kv_stride, s, ot + st * D * W, D, nk, static_cast<const S*>(alpha + c0));
    }
  }

  T* out = static_cast<T*>(p.out) + ((r.q_start + i0) * p.Hq + h) * D;
  S* lse = static_cast<S*>(p.lse);
  for (int64_t i = 0; i < nq; ++i) {
    const S inv = l[i] > S(0) ? S(1) / l[i] : S(0);
    const S* col = ot + (i / W) * D * W + i % W;
    for (int64_t c = 0; c < D; ++c) out[i * q_stride + c] = static_cast<T>(col[c * W] * inv);
    lse[lse_offset(p, b, h, r, i0 + i)] =
        l[i] > S(0) ? (m[i] + std::log2(l[i])) * static_cast<S>(kLn2) : -inf;
  }
}

// Runs fn(item, scratch) for every item in [0, n) on the intra-op threads,
// handing the items out one at a time from a shared counter instead of in
// fixed chunks: causal and varlen items differ in cost, and a core shared with
// another process falls behind. An item is computed the same way whichever
// thread runs it, so results do not depend on the schedule.
template <typename Scratch, typename Fn>
void parallel_items(int64_t n, int64_t D, const Fn& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Scratch w(D);
    for (int64_t item = next.fetch_add(1, std::memory_order_relaxed); item < n;
         item = next.fetch_add(1, std::memory_order_relaxed))
      fn(item, w);
  });
}

template <typename T>
void fwd(const AttnParams& p) {
  using S = typename ComputeOf<T>::type;
  const int64_t nqb = (p.seqlen_q + kFwdBlockQ - 1) / kFwdBlockQ;
  parallel_items<FwdScratch<S>>(p.B * p.Hq * nqb, p.D, [&](int64_t item, FwdScratch<S>& w) {
    const int64_t qb = item % nqb, h = (item / nqb) % p.Hq, b = item / (nqb * p.Hq);
    const int64_t i0 = qb * kFwdBlockQ, q_len = seq_range(p, b).q_len;
    if (i0 < q_len) fwd_block<T, S>(p, b, h, i0, std::min(kFwdBlockQ, q_len - i0), w);
  });
}

// Per-row inputs of the backward for query rows [i0, i0 + nq) of (b, h).
template <typename T, typename S>
struct QueryBlock {
  std::vector<S> q, dout, lse2, delta;
  QueryBlock(int64_t D) : q(kBlockQ * D), dout(kBlockQ * D), lse2(kBlockQ), delta(kBlockQ) {}
  void load(const AttnParams& p, const std::vector<S>& all_delta, int64_t b, int64_t h,
            const SeqRange& r, int64_t i0, int64_t nq) {
    const int64_t D = p.D, off = ((r.q_start + i0) * p.Hq + h) * D, stride = p.Hq * D;
    load_rows(static_cast<const T*>(p.q) + off, stride, nq, D, S(1), q.data());
    load_rows(static_cast<const T*>(p.dout) + off, stride, nq, D, S(1), dout.data());
    const S* lse = static_cast<const S*>(p.lse);
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t at = lse_offset(p, b, h, r, i0 + i);
      lse2[i] = lse[at] * static_cast<S>(kLog2e);
      delta[i] = all_delta[at];
    }
  }
};

// s (scores, then p, then ds) and dp for one (query block, key block):
// p = exp2(scale2 * q.k - lse2), dp = dout.v, ds = p * (dp - delta).
template <typename S>
void grad_scores(const AttnParams& p, int64_t b, const SeqRange& r, int64_t i0, int64_t nq,
                 int64_t j0, int64_t nk, const S* q, const S* dout, const S* lse2,
                 const S* delta, const S* kt, const S* vt, S scale2, S* s, S* dp) {
  const int64_t D = p.D;
  scores(q, nq, kt, D, s);
  probs(lse2, nq, nk, scale2, s);
  apply_mask(p, b, r, i0, nq, j0, nk, s, S(0));
  scores(dout, nq, vt, D, dp);
  for (int64_t i = 0; i < nq; ++i) {
    const S* pr = s + i * kBlockK;
    S* d = dp + i * kBlockK;
    for (int64_t j = 0; j < nk; ++j) d[j] = pr[j] * (d[j] - delta[i]);
  }
}

template <typename T>
void bwd(const AttnParams& p) {
  using S = typename ComputeOf<T>::type;
  const int64_t D = p.D, group = p.Hq / p.Hkv;
  const S scale = static_cast<S>(p.softmax_scale);
  const S scale2 = static_cast<S>(p.softmax_scale * kLog2e);
  const int64_t q_stride = p.Hq * D, k_stride = p.Hkv * D;

  // delta, laid out like lse.
  const int64_t lse_numel = p.cu_seqlens_q ? p.Hq * p.total_q : p.B * p.Hq * p.seqlen_q;
  std::vector<S> delta(lse_numel, S(0));
  const int64_t nqb = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t q_items = p.B * p.Hq * nqb;
  at::parallel_for(0, q_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % nqb, h = (item / nqb) % p.Hq, b = item / (nqb * p.Hq);
      const SeqRange r = seq_range(p, b);
      for (int64_t i = qb * kBlockQ; i < std::min(r.q_len, (qb + 1) * kBlockQ); ++i) {
        const int64_t off = ((r.q_start + i) * p.Hq + h) * D;
        const T* o = static_cast<const T*>(p.out) + off;
        const T* g = static_cast<const T*>(p.dout) + off;
        S prod[8 * ((kMaxRow + 7) / 8)];
        for (int64_t c = 0; c < D; ++c) prod[c] = static_cast<S>(o[c]) * static_cast<S>(g[c]);
        const S sum = lane_sum(prod, D);
        delta[lse_offset(p, b, h, r, i)] = sum;
      }
    }
  });

  // dk, dv: one writer per key row.
  const int64_t nkb = (p.seqlen_k + kBlockK - 1) / kBlockK;
  const int64_t k_items = p.B * p.Hkv * nkb;
  at::parallel_for(0, k_items, 1, [&](int64_t begin, int64_t end) {
    QueryBlock<T, S> qblk(D);
    std::vector<S> kt(D * kBlockK), vt(D * kBlockK), s(kBlockQ * kBlockK), dp(kBlockQ * kBlockK);
    std::vector<S> dk(kBlockK * D), dv(kBlockK * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kb = item % nkb, hk = (item / nkb) % p.Hkv, b = item / (nkb * p.Hkv);
      const SeqRange r = seq_range(p, b);
      const int64_t j0 = kb * kBlockK;
      if (j0 >= r.k_len) continue;
      const int64_t nk = std::min(kBlockK, r.k_len - j0);
      const int64_t koff = ((r.k_start + j0) * p.Hkv + hk) * D;
      load_rows_t(static_cast<const T*>(p.k) + koff, k_stride, nk, D, kt.data());
      load_rows_t(static_cast<const T*>(p.v) + koff, k_stride, nk, D, vt.data());
      std::fill(dk.begin(), dk.end(), S(0));
      std::fill(dv.begin(), dv.end(), S(0));
      // The first query that sees key j0 causally.
      const int64_t i_begin = p.causal ? std::max<int64_t>(0, j0 + r.q_len - r.k_len) : 0;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = i_begin; i0 < r.q_len; i0 += kBlockQ) {
          const int64_t nq = std::min(kBlockQ, r.q_len - i0);
          qblk.load(p, delta, b, h, r, i0, nq);
          grad_scores(p, b, r, i0, nq, j0, nk, qblk.q.data(), qblk.dout.data(),
                      qblk.lse2.data(), qblk.delta.data(), kt.data(), vt.data(), scale2,
                      s.data(), dp.data());
          // dv_j += p_ij dout_i and dk_j += ds_ij q_i, in query order.
          accumulate_t(s.data(), nq, nk, qblk.dout.data(), D, dv.data());
          accumulate_t(dp.data(), nq, nk, qblk.q.data(), D, dk.data());
        }
      }
      T* dkp = static_cast<T*>(p.dk) + koff;
      T* dvp = static_cast<T*>(p.dv) + koff;
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t c = 0; c < D; ++c) {
          dkp[j * k_stride + c] = static_cast<T>(dk[j * D + c] * scale);
          dvp[j * k_stride + c] = static_cast<T>(dv[j * D + c]);
        }
    }
  });

  // dq: one writer per query row.
  at::parallel_for(0, q_items, 1, [&](int64_t begin, int64_t end) {
    QueryBlock<T, S> qblk(D);
    std::vector<S> kt(D * kBlockK), vt(D * kBlockK), ks(kBlockK * D), s(kBlockQ * kBlockK),
        dp(kBlockQ * kBlockK), dq(kBlockQ * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % nqb, h = (item / nqb) % p.Hq, b = item / (nqb * p.Hq);
      const SeqRange r = seq_range(p, b);
      const int64_t i0 = qb * kBlockQ;
      if (i0 >= r.q_len) continue;
      const int64_t nq = std::min(kBlockQ, r.q_len - i0), hk = h / group;
      qblk.load(p, delta, b, h, r, i0, nq);
      std::fill(dq.begin(), dq.end(), S(0));
      const int64_t kend = key_limit(p, r, i0 + nq - 1);
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, kend - j0);
        const int64_t koff = ((r.k_start + j0) * p.Hkv + hk) * D;
        const T* kp = static_cast<const T*>(p.k) + koff;
        load_rows_t(kp, k_stride, nk, D, kt.data());
        load_rows_t(static_cast<const T*>(p.v) + koff, k_stride, nk, D, vt.data());
        load_rows(kp, k_stride, nk, D, S(1), ks.data());
        grad_scores(p, b, r, i0, nq, j0, nk, qblk.q.data(), qblk.dout.data(), qblk.lse2.data(),
                    qblk.delta.data(), kt.data(), vt.data(), scale2, s.data(), dp.data());
        accumulate(dp.data(), nq, nk, ks.data(), D, dq.data());
      }
      T* dqp = static_cast<T*>(p.dq) + ((r.q_start + i0) * p.Hq + h) * D;
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t c = 0; c < D; ++c) dqp[i * q_stride + c] = static_cast<T>(dq[i * D + c] * scale);
    }
  });
}

template <template <typename> class F>
void dispatch(const AttnParams& p) {
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
