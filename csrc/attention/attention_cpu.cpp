// CPU kernels for exact attention (FlashAttention-2's algorithm on CPU).
//
// Forward: one work item per (sample, query head, block of kBlockQ queries),
// spread over threads with at::parallel_for. The query block is converted once
// to the compute type (fp32; fp64 for fp64 data) with softmax_scale * log2(e)
// folded in, then each block of kBlockK keys is converted (K transposed, so the
// score loop runs over keys: contiguous and vectorizable without reassociating
// any sum), scored, and folded into a running max / sum / output (online
// softmax in base 2). Nothing of size Lq x Lk is ever stored.
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
#include <cmath>
#include <limits>
#include <vector>

#include "attention/attention_params.h"

namespace dsk::attention {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
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

// The same rows transposed: dst[c * kBlockK + r].
template <typename T, typename S>
void load_rows_t(const T* src, int64_t stride, int64_t n, int64_t D, S* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + r * stride;
    for (int64_t c = 0; c < D; ++c) dst[c * kBlockK + r] = static_cast<S>(s[c]);
  }
}

// out[i][j] = sum_c a[i][c] * bt[c][j] for i < n, j < m (bt has row length kBlockK),
// summed in c order.
template <typename S>
void scores(const S* a, int64_t n, const S* bt, int64_t m, int64_t D, S* out) {
  for (int64_t i = 0; i < n; ++i) {
    S* o = out + i * kBlockK;
    for (int64_t j = 0; j < m; ++j) o[j] = S(0);
    for (int64_t c = 0; c < D; ++c) {
      const S ac = a[i * D + c];
      const S* b = bt + c * kBlockK;
      for (int64_t j = 0; j < m; ++j) o[j] += ac * b[j];
    }
  }
}

// acc[D] += w * row[D]
template <typename S>
inline void axpy(S w, const S* row, int64_t D, S* acc) {
  for (int64_t c = 0; c < D; ++c) acc[c] += w * row[c];
}

// Sets s[i][j] to -inf where query i0 + i does not see key j0 + j; returns
// whether any key is visible to any row.
template <typename S>
bool apply_mask(const AttnParams& p, int64_t b, const SeqRange& r, int64_t i0, int64_t nq,
                int64_t j0, int64_t nk, S* s) {
  const bool* pad = p.key_padding_mask ? p.key_padding_mask + b * p.seqlen_k + j0 : nullptr;
  bool any = false;
  for (int64_t i = 0; i < nq; ++i) {
    S* row = s + i * kBlockK;
    const int64_t lim = key_limit(p, r, i0 + i) - j0;
    for (int64_t j = 0; j < nk; ++j) {
      const bool visible = j < lim && !(pad && pad[j]);
      row[j] = visible ? row[j] : -std::numeric_limits<S>::infinity();
      any = any || visible;
    }
  }
  return any;
}

// p[i][j] = exp2(s[i][j] * scale2 - lse2[i]) (0 where masked or the row sees nothing).
template <typename S>
void probs(const S* lse2, int64_t nq, int64_t nk, S scale2, S* s) {
  for (int64_t i = 0; i < nq; ++i) {
    S* row = s + i * kBlockK;
    const S l = lse2[i];
    if (l == -std::numeric_limits<S>::infinity()) {
      for (int64_t j = 0; j < nk; ++j) row[j] = S(0);
      continue;
    }
    for (int64_t j = 0; j < nk; ++j) row[j] = std::exp2(row[j] * scale2 - l);
  }
}

template <typename T>
void fwd(const AttnParams& p) {
  using S = typename ComputeOf<T>::type;
  const int64_t D = p.D, group = p.Hq / p.Hkv;
  const int64_t nqb = (p.seqlen_q + kBlockQ - 1) / kBlockQ;
  const int64_t items = p.B * p.Hq * nqb;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  S* lse = static_cast<S*>(p.lse);
  const S scale2 = static_cast<S>(p.softmax_scale * kLog2e);
  const S inf = std::numeric_limits<S>::infinity();

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> qs(kBlockQ * D), kt(D * kBlockK), vs(kBlockK * D), s(kBlockQ * kBlockK);
    std::vector<S> acc(kBlockQ * D), m(kBlockQ), l(kBlockQ);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % nqb, h = (item / nqb) % p.Hq, b = item / (nqb * p.Hq);
      const SeqRange r = seq_range(p, b);
      const int64_t i0 = qb * kBlockQ;
      if (i0 >= r.q_len) continue;
      const int64_t nq = std::min(kBlockQ, r.q_len - i0), hk = h / group;
      const int64_t q_stride = p.Hq * D, k_stride = p.Hkv * D;
      const T* qrow = q + ((r.q_start + i0) * p.Hq + h) * D;
      load_rows(qrow, q_stride, nq, D, scale2, qs.data());
      std::fill(acc.begin(), acc.begin() + nq * D, S(0));
      std::fill(m.begin(), m.begin() + nq, -inf);
      std::fill(l.begin(), l.begin() + nq, S(0));
      const int64_t kend = key_limit(p, r, i0 + nq - 1);
      for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, kend - j0);
        const int64_t koff = ((r.k_start + j0) * p.Hkv + hk) * D;
        load_rows_t(k + koff, k_stride, nk, D, kt.data());
        scores(qs.data(), nq, kt.data(), nk, D, s.data());
        if (!apply_mask(p, b, r, i0, nq, j0, nk, s.data())) continue;
        load_rows(v + koff, k_stride, nk, D, S(1), vs.data());
        for (int64_t i = 0; i < nq; ++i) {
          S* row = s.data() + i * kBlockK;
          S mx = -inf;
          for (int64_t j = 0; j < nk; ++j) mx = row[j] > mx ? row[j] : mx;
          if (mx == -inf) continue;  // this row sees no key of this block
          const S mnew = std::max(m[i], mx);
          const S alpha = std::exp2(m[i] - mnew);  // 0 for the first visible block
          S sum = S(0);
          for (int64_t j = 0; j < nk; ++j) {
            row[j] = std::exp2(row[j] - mnew);
            sum += row[j];
          }
          l[i] = l[i] * alpha + sum;
          m[i] = mnew;
          S* a = acc.data() + i * D;
          for (int64_t c = 0; c < D; ++c) a[c] *= alpha;
          for (int64_t j = 0; j < nk; ++j) axpy(row[j], vs.data() + j * D, D, a);
        }
      }
      for (int64_t i = 0; i < nq; ++i) {
        T* o = out + ((r.q_start + i0 + i) * p.Hq + h) * D;
        const S inv = l[i] > S(0) ? S(1) / l[i] : S(0);
        const S* a = acc.data() + i * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(a[c] * inv);
        lse[lse_offset(p, b, h, r, i0 + i)] =
            l[i] > S(0) ? (m[i] + std::log2(l[i])) * static_cast<S>(kLn2) : -inf;
      }
    }
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
  scores(q, nq, kt, nk, D, s);
  apply_mask(p, b, r, i0, nq, j0, nk, s);
  probs(lse2, nq, nk, scale2, s);
  scores(dout, nq, vt, nk, D, dp);
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
        S sum = S(0);
        for (int64_t c = 0; c < D; ++c) sum += static_cast<S>(o[c]) * static_cast<S>(g[c]);
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
          for (int64_t i = 0; i < nq; ++i) {
            const S* pr = s.data() + i * kBlockK;
            const S* dsr = dp.data() + i * kBlockK;
            for (int64_t j = 0; j < nk; ++j) {
              axpy(pr[j], qblk.dout.data() + i * D, D, dv.data() + j * D);
              axpy(dsr[j], qblk.q.data() + i * D, D, dk.data() + j * D);
            }
          }
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
        for (int64_t i = 0; i < nq; ++i) {
          const S* dsr = dp.data() + i * kBlockK;
          for (int64_t j = 0; j < nk; ++j) axpy(dsr[j], ks.data() + j * D, D, dq.data() + i * D);
        }
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
