// CPU kernels for MoE routing. Gating: chunks of kScoreSumChunk token rows
// spread over threads with at::parallel_for (each row: scores, group routing,
// top-k, weights; each chunk: per-expert counts, ranks and score sums), then a
// sequential pass over chunks per expert (bases, counts, mean scores), then
// slots. Dispatch/combine: one token per iteration, rows copied or accumulated
// in a fixed choice order. Compiled with -ffp-contract=off (see moe_math.h).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "moe/moe_math.h"
#include "moe/moe_params.h"

namespace dsk::moe {
namespace {

constexpr int64_t kGrainWork = 1 << 15;

template <typename T> inline float to_compute(T v) { return static_cast<float>(v); }
inline double to_compute(double v) { return v; }

template <typename S> inline bool is_finite(S v) { return std::isfinite(v); }

// Per-row routing, scratch reused across the rows of one thread.
template <typename S>
struct RowScratch {
  std::vector<S> p, sel, gscore;
  std::vector<uint8_t> allowed;
  explicit RowScratch(const GatingParams& g) : p(g.E), sel(g.E), gscore(g.n_group), allowed(g.n_group) {}
};

// Routes one row; returns false for an invalid (non-finite) row. The loops over
// the E scores are branch-free (moe_math.h), so they vectorize; the top-k is one
// pass over the allowed experts in index order.
template <typename T, typename S>
bool route_row(const GatingParams& g, const T* x, const S* bias, RowScratch<S>& s, int32_t* ids,
               S* w) {
  const int64_t E = g.E;
  S* p = s.p.data();
  bool finite = g.bias_finite;
  S m = -INFINITY;
  for (int64_t e = 0; e < E; ++e) {
    const S v = to_compute(x[e]);
    p[e] = v;
    finite = finite && is_finite(v);
    m = v > m ? v : m;
  }
  if (!finite) return false;
  if (g.softmax) {
    for (int64_t e = 0; e < E; ++e) p[e] = exp_nonpos(fsub(p[e], m));
    // Lane l sums p[l], p[l + 32], ... in order (blocks of kSumLanes, so it vectorizes).
    S lanes[kSumLanes];
    for (int l = 0; l < kSumLanes; ++l) lanes[l] = S(0);
    for (int64_t e0 = 0; e0 < E; e0 += kSumLanes) {
      const int64_t n = std::min<int64_t>(kSumLanes, E - e0);
      for (int64_t l = 0; l < n; ++l) lanes[l] = fadd(lanes[l], p[e0 + l]);
    }
    for (int half = kSumLanes / 2; half >= 1; half /= 2)
      for (int l = 0; l < half; ++l) lanes[l] = fadd(lanes[l], lanes[l + half]);
    const S sum = lanes[0];
    for (int64_t e = 0; e < E; ++e) p[e] = fdiv(p[e], sum);
  } else {
    for (int64_t e = 0; e < E; ++e) p[e] = sigmoid_score(p[e]);
  }
  // Selection scores: p + bias, or p itself.
  const S* sel = p;
  if (bias) {
    S* biased = s.sel.data();
    for (int64_t e = 0; e < E; ++e) biased[e] = fadd(p[e], bias[e]);
    sel = biased;
  }

  const int64_t G = g.n_group, gsize = E / G;
  uint8_t* allowed = s.allowed.data();
  if (G > 1 && g.topk_group < G) {
    for (int64_t grp = 0; grp < G; ++grp) {
      S b1 = -INFINITY, b2 = -INFINITY;
      for (int64_t e = grp * gsize; e < (grp + 1) * gsize; ++e) {
        if (sel[e] > b1) { b2 = b1; b1 = sel[e]; }
        else if (sel[e] > b2) { b2 = sel[e]; }
      }
      s.gscore[grp] = gsize >= 2 ? fadd(b1, b2) : b1;
      allowed[grp] = 0;
    }
    for (int64_t r = 0; r < g.topk_group; ++r) {
      int64_t best = -1;
      for (int64_t grp = 0; grp < G; ++grp)
        if (!allowed[grp] && (best < 0 || s.gscore[grp] > s.gscore[best])) best = grp;
      allowed[best] = 1;
    }
  } else {
    std::fill(allowed, allowed + G, uint8_t{1});
  }
  // The k largest selection scores of the allowed experts, descending, ties to
  // the lower index: visited in index order, a score enters the sorted list
  // after every score >= it (all earlier experts), so an equal later one never
  // displaces it. (The scores are finite: a non-finite row returned above.)
  const int64_t k = g.k;
  S top[kMaxK];
  int64_t n_top = 0;
  for (int64_t grp = 0; grp < G; ++grp) {
    if (!allowed[grp]) continue;
    for (int64_t e = grp * gsize; e < (grp + 1) * gsize; ++e) {
      const S v = sel[e];
      if (n_top == k && !(v > top[k - 1])) continue;
      int64_t i = n_top < k ? n_top++ : k - 1;
      for (; i > 0 && v > top[i - 1]; --i) {
        top[i] = top[i - 1];
        ids[i] = ids[i - 1];
      }
      top[i] = v;
      ids[i] = static_cast<int32_t>(e);
    }
  }
  for (int64_t j = 0; j < k; ++j) w[j] = p[ids[j]];
  if (g.renormalize) {
    S sum = S(0);
    for (int64_t j = 0; j < k; ++j) sum = fadd(sum, w[j]);
    if (sum > S(0))
      for (int64_t j = 0; j < k; ++j) w[j] = fdiv(w[j], sum);
  }
  const S scale = static_cast<S>(g.routed_scaling_factor);
  for (int64_t j = 0; j < k; ++j) w[j] = fmul(w[j], scale);
  return true;
}

template <typename T, typename S>
int64_t gating_typed(const GatingParams& g) {
  const int64_t T_ = g.T, E = g.E, k = g.k;
  const T* logits = static_cast<const T*>(g.logits);
  const S* bias = static_cast<const S*>(g.bias);
  S* weights = static_cast<S*>(g.weights);
  S* mean = static_cast<S*>(g.mean_scores);
  const int64_t nchunks = (T_ + kScoreSumChunk - 1) / kScoreSumChunk;
  GatingParams gp = g;
  if (bias) {
    for (int64_t e = 0; e < E; ++e) gp.bias_finite = gp.bias_finite && is_finite(bias[e]);
  }

  // Phase 1: rows, per chunk: counts (-> per-chunk base), local ranks, score sums.
  std::vector<int32_t> chunk_counts(static_cast<size_t>(nchunks * E), 0);
  std::vector<S> partial(static_cast<size_t>(nchunks * E), S(0));
  std::vector<int32_t> local_rank(static_cast<size_t>(T_ * k), 0);
  // Grains of ~kGrainWork elements: small problems run inline (a parallel region
  // costs more than they do, and much more on a busy machine).
  const int64_t chunk_grain = std::max<int64_t>(1, kGrainWork / (kScoreSumChunk * E));
  at::parallel_for(0, nchunks, chunk_grain, [&](int64_t c0, int64_t c1) {
    RowScratch<S> s(gp);
    for (int64_t c = c0; c < c1; ++c) {
      int32_t* cnt = chunk_counts.data() + c * E;
      S* part = partial.data() + c * E;
      const int64_t t_end = std::min(T_, (c + 1) * kScoreSumChunk);
      for (int64_t t = c * kScoreSumChunk; t < t_end; ++t) {
        int32_t* ids = g.expert_ids + t * k;
        S* w = weights + t * k;
        if (!route_row<T, S>(gp, logits + t * E, bias, s, ids, w)) {
          for (int64_t j = 0; j < k; ++j) { ids[j] = -1; w[j] = S(0); }
          continue;
        }
        for (int64_t e = 0; e < E; ++e) part[e] = fadd(part[e], s.p[e]);
        for (int64_t j = 0; j < k; ++j) local_rank[t * k + j] = cnt[ids[j]]++;
      }
    }
  });

  // Phase 2: per expert, sequentially over chunks: chunk bases, routed counts, mean scores.
  std::vector<int32_t>& chunk_base = chunk_counts;  // converted in place
  const S denom = static_cast<S>(T_ > 0 ? T_ : 1);
  const int active_lanes = static_cast<int>(std::min<int64_t>(nchunks, kMeanLanes));
  at::parallel_for(0, E, std::max<int64_t>(1, kGrainWork / (nchunks + 1)), [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      int32_t run = 0;
      S lanes[kMeanLanes];
      for (int l = 0; l < std::max(active_lanes, 1); ++l) lanes[l] = S(0);
      for (int64_t c = 0; c < nchunks; ++c) {
        const int32_t n = chunk_counts[c * E + e];
        chunk_base[c * E + e] = run;
        run += n;
        lanes[c % kMeanLanes] = fadd(lanes[c % kMeanLanes], partial[c * E + e]);
      }
      // Lanes at or past `active` hold +0, and x + (+0) == x for these sums of
      // non-negative scores: the halving tree skips them (same bits, and a small
      // T no longer pays for all kMeanLanes lanes of every expert).
      int active = active_lanes;
      for (int half = kMeanLanes / 2; half >= 1; half /= 2) {
        for (int l = 0; l + half < active; ++l) lanes[l] = fadd(lanes[l], lanes[l + half]);
        active = std::min(active, half);
      }
      g.routed_counts[e] = run;
      mean[e] = fdiv(lanes[0], denom);
    }
  });

  // Phase 3: ranks -> slots.
  const int64_t cap = g.capacity;
  std::vector<int32_t> rank(static_cast<size_t>(T_ * k), -1);
  at::parallel_for(0, T_, std::max<int64_t>(1, kGrainWork / k), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = g.expert_ids[t * k + j];
        int32_t slot = -1;
        if (e >= 0) {
          const int32_t r = chunk_base[(t / kScoreSumChunk) * E + e] + local_rank[t * k + j];
          rank[t * k + j] = r;
          slot = (cap < 0 || g.drop_probability || r < cap) ? r : -1;
        }
        g.slots[t * k + j] = slot;
      }
    }
  });
  for (int64_t e = 0; e < E; ++e)
    g.expert_counts[e] = cap < 0 ? g.routed_counts[e]
                                 : static_cast<int32_t>(std::min<int64_t>(g.routed_counts[e], cap));
  if (cap < 0 || !g.drop_probability) return -1;

  // Probability dropping: per expert, its choices in token order (a counting
  // sort by expert), the capacity largest weights kept (stable: ties keep the
  // earlier token), kept ones renumbered in token order.
  std::vector<int64_t> offset(static_cast<size_t>(E) + 1, 0);
  for (int64_t e = 0; e < E; ++e) offset[e + 1] = offset[e] + g.routed_counts[e];
  std::vector<int64_t> order(static_cast<size_t>(offset[E]));
  for (int64_t i = 0; i < T_ * k; ++i) {
    const int32_t e = g.expert_ids[i];
    if (e >= 0) order[offset[e] + rank[i]] = i;
  }
  at::parallel_for(0, E, std::max<int64_t>(1, kGrainWork * E / (offset[E] + 1)), [&](int64_t e0, int64_t e1) {
    std::vector<int64_t> idx;
    std::vector<uint8_t> keep;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t n = offset[e + 1] - offset[e];
      if (n <= cap) continue;  // all kept, slot = rank
      const int64_t* ord = order.data() + offset[e];
      idx.resize(static_cast<size_t>(n));
      std::iota(idx.begin(), idx.end(), int64_t{0});
      std::stable_sort(idx.begin(), idx.end(),
                       [&](int64_t a, int64_t b) { return weights[ord[a]] > weights[ord[b]]; });
      keep.assign(static_cast<size_t>(n), 0);
      for (int64_t r = 0; r < cap; ++r) keep[idx[r]] = 1;
      int32_t slot = 0;
      for (int64_t r = 0; r < n; ++r) g.slots[ord[r]] = keep[r] ? slot++ : -1;
    }
  });
  return -1;
}

// ---------------------------------------------------------------------------
// Rows: dispatch/permute (scatter) and combine/unpermute (gather)
// ---------------------------------------------------------------------------

// The row of choice i, -1 when dropped (id or slot -1), -2 when out of range
// (below -1, or past the experts or the expert's rows).
inline int64_t choice_row(const RowsParams& p, int64_t i) {
  const int32_t e = p.expert_ids[i], s = p.slots[i];
  if (e < -1 || s < -1) return -2;
  if (e == -1 || s == -1) return -1;
  if (e >= p.E) return -2;
  const int64_t limit = p.slot_limit ? p.slot_limit[e] : p.capacity;
  if (s >= limit) return -2;
  return (p.row_base ? p.row_base[e] : e * p.capacity) + s;
}

// Output-major: a map from each dst row to its choice (one pass over the
// choices), then every dst row written exactly once, in parallel: a copy, a
// weighted copy or zeros. No separate zero fill, and a fresh output's pages are
// first touched by the threads that write them.
template <typename T, typename S>
int64_t scatter_typed(const RowsParams& p) {
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  const S* w = static_cast<const S*>(p.weights);
  std::vector<int64_t> choice_of_row(static_cast<size_t>(p.dst_rows), -1);
  int64_t bad = -1;
  for (int64_t i = 0; i < p.T * p.k; ++i) {
    const int64_t row = choice_row(p, i);
    if (row == -2) bad = i;
    if (row >= 0 && row < p.dst_rows) choice_of_row[row] = i;
  }
  if (bad >= 0) return bad;
  at::parallel_for(0, p.dst_rows, std::max<int64_t>(1, kGrainWork / (p.H + 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* out = dst + r * p.H;
      const int64_t i = choice_of_row[r];
      if (i < 0) {
        std::memset(static_cast<void*>(out), 0, static_cast<size_t>(p.H) * sizeof(T));
        continue;
      }
      const T* x = src + (i / p.k) * p.H;
      if (!w) {
        std::memcpy(static_cast<void*>(out), x, static_cast<size_t>(p.H) * sizeof(T));
      } else {
        const S wi = w[i];
        for (int64_t h = 0; h < p.H; ++h) out[h] = static_cast<T>(fmul(wi, to_compute(x[h])));
      }
    }
  });
  return -1;
}

template <typename T, typename S>
int64_t gather_typed(const RowsParams& p) {
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  const S* w = static_cast<const S*>(p.weights);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, p.T, std::max<int64_t>(1, kGrainWork / (p.k * p.H + 1)), [&](int64_t t0, int64_t t1) {
    std::vector<S> acc(static_cast<size_t>(p.H));
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), S(0));
      for (int64_t j = 0; j < p.k; ++j) {
        const int64_t row = choice_row(p, t * p.k + j);
        if (row == -2) { bad.store(t * p.k + j); continue; }
        if (row < 0) continue;
        const T* r = src + row * p.H;
        S* a = acc.data();
        if (!w) {
          for (int64_t h = 0; h < p.H; ++h) a[h] = fadd(a[h], to_compute(r[h]));
        } else {
          const S wj = w[t * p.k + j];
          for (int64_t h = 0; h < p.H; ++h) a[h] = fadd(a[h], fmul(wj, to_compute(r[h])));
        }
      }
      T* out = dst + t * p.H;
      for (int64_t h = 0; h < p.H; ++h) out[h] = static_cast<T>(acc[h]);
    }
  });
  return bad.load();
}


template <typename T, typename S>
int64_t rows_dot_typed(const RowsParams& p) {
  const T* src = static_cast<const T*>(p.src);
  const T* other = static_cast<const T*>(p.other);
  S* dst = static_cast<S*>(p.dst);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, p.T, std::max<int64_t>(1, kGrainWork / (p.k * p.H + 1)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* o = other + t * p.H;
      for (int64_t j = 0; j < p.k; ++j) {
        const int64_t row = choice_row(p, t * p.k + j);
        if (row == -2) bad.store(t * p.k + j);
        if (row < 0) { dst[t * p.k + j] = S(0); continue; }
        const T* r = src + row * p.H;
        S lanes[kSumLanes];
        for (int l = 0; l < kSumLanes; ++l) lanes[l] = S(0);
        for (int64_t h = 0; h < p.H; ++h)
          lanes[h % kSumLanes] = fadd(lanes[h % kSumLanes], fmul(to_compute(o[h]), to_compute(r[h])));
        for (int half = kSumLanes / 2; half >= 1; half /= 2)
          for (int l = 0; l < half; ++l) lanes[l] = fadd(lanes[l], lanes[l + half]);
        dst[t * p.k + j] = lanes[0];
      }
    }
  });
  return bad.load();
}

}  // namespace

int64_t gating_cpu(const GatingParams& p) {
  switch (p.logits_dtype) {
    case DType::kFloat32: return gating_typed<float, float>(p);
    case DType::kFloat16: return gating_typed<c10::Half, float>(p);
    case DType::kBFloat16: return gating_typed<c10::BFloat16, float>(p);
    case DType::kFloat64: return gating_typed<double, double>(p);
  }
  return -1;
}

int64_t scatter_rows_cpu(const RowsParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return scatter_typed<float, float>(p);
    case DType::kFloat16: return scatter_typed<c10::Half, float>(p);
    case DType::kBFloat16: return scatter_typed<c10::BFloat16, float>(p);
    case DType::kFloat64: return scatter_typed<double, double>(p);
  }
  return -1;
}

int64_t gather_rows_cpu(const RowsParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return gather_typed<float, float>(p);
    case DType::kFloat16: return gather_typed<c10::Half, float>(p);
    case DType::kBFloat16: return gather_typed<c10::BFloat16, float>(p);
    case DType::kFloat64: return gather_typed<double, double>(p);
  }
  return -1;
}

int64_t rows_dot_cpu(const RowsParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return rows_dot_typed<float, float>(p);
    case DType::kFloat16: return rows_dot_typed<c10::Half, float>(p);
    case DType::kBFloat16: return rows_dot_typed<c10::BFloat16, float>(p);
    case DType::kFloat64: return rows_dot_typed<double, double>(p);
  }
  return -1;
}

}  // namespace dsk::moe
