// Plain parameter struct and launchers for exact (FlashAttention-style)
// attention. Filled by attention_api.cpp, which validates the tensors; CPU
// kernels in attention_cpu.cpp, CUDA kernels in attention_{fwd,bwd}_cuda.cu.
//
// Layout: q/out/dq rows are [total_q, Hq, D] and k/v/dk/dv rows [total_k, Hkv, D],
// contiguous. The padded ops are the varlen ops with sample b's rows starting
// at b * Lq (q) and b * Lk (k): cu_seqlens_* are null and seqlen_* fixed.
//
// Semantics (shared with deepseek_kernels/reference.py):
//   s_ij = softmax_scale * <q_i, k_j>; query i of a sample with Lq_b queries and
//   Lk_b keys sees key j when the key is not padding and, if causal,
//   j <= i + Lk_b - Lq_b (bottom-right alignment). out_i = sum_j p_ij v_j with
//   p = softmax over the visible keys; lse_i = log sum_j exp(s_ij) (natural log).
//   A query that sees no key gets out = 0, lse = -inf and zero gradients.
//   Query head h reads key/value head h / (Hq / Hkv) (GQA/MQA).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/host_device.h"

namespace dsk::attention {

// log2(e): the kernels exponentiate with exp2 of scores scaled by softmax_scale * log2(e).
constexpr double kLog2e = 1.4426950408889634;

// The default forward generation: v3 for D = 128 (on an H100, B=8 H=16 Lq=1024
// Lk=4096: v3 0.75 ms, v2 0.81, SDPA flash 0.77), v2 for D = 64 (v2 0.44 ms, v3
// 0.54), each falling back as fwd_kernel says; v1 for other D.
constexpr int kAttentionFwdAuto = 4;
// The default backward generation: v3 where it can run (sm_90a build and GPU, D
// 64/128; on an H100, B=8 H=16 Lq=1024 Lk=4096: v3 3.04 ms at D=128 and 1.86 at
// D=64, v1 4.95 and 3.13, v2 6.69 and 4.42, SDPA flash 2.32 and 1.29), else v1.
constexpr int kAttentionBwdAuto = 4;

struct AttnParams {
  DType dtype = DType::kFloat32;  // of q, k, v, out and the gradients
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  void* lse = nullptr;  // padded: [B, Hq, Lq]; varlen: [Hq, total_q]; fp32 (fp64 for fp64 data)

  int64_t B = 0, Hq = 0, Hkv = 0, D = 0;
  int64_t total_q = 0, total_k = 0;
  int64_t seqlen_q = 0, seqlen_k = 0;  // padded: Lq, Lk; varlen: max_seqlen_q/k, at most total_q/k
  const int32_t* cu_seqlens_q = nullptr;  // [B + 1] or null (padded)
  const int32_t* cu_seqlens_k = nullptr;
  const bool* key_padding_mask = nullptr;  // padded only: [B, Lk], true = ignore the key

  double softmax_scale = 1.0;  // the CUDA kernels round it to fp32
  bool causal = false;
  // CUDA forward kernel generation: 1, 2 (attention_fwd_v2_kernel.cuh) where
  // attention_fwd_v2_supported says so, 3 (attention_fwd_v3_kernel.cuh, wgmma)
  // where it can run (else 2, else 1), or kAttentionFwdAuto. Set from
  // DSK_ATTENTION_KERNEL / _attention_cuda_kernel (attention_api.cpp).
  int fwd_kernel = 1;
  // Whether the build holds sm_90a code (v3's wgmma): from the build's arch list.
  bool built_sm90a = false;

  // Backward only.
  const void* dout = nullptr;  // like out
  void* dq = nullptr;          // like q
  void* dk = nullptr;          // like k
  void* dv = nullptr;          // like v
  float* delta = nullptr;      // CUDA workspace: rowsum(dout * out), laid out like lse
  // CUDA backward generation that runs: 1, 2 (attention_bwd_v2_kernel.cuh) or 3
  // (attention_bwd_v3_kernel.cuh, wgmma), chosen by the glue (DSK_ATTENTION_BWD_KERNEL,
  // kAttentionBwdAuto), which allocates the workspace below for the one it picked.
  int bwd_kernel = 1;
  // v2 and v3, allocated zeroed by the glue: fp32 accumulators laid out like dq,
  // dq_splits of them (v3: each written by one CTA per kv head; summed in split
  // order by the last kernel), and v2's attention_bwd_v2_semaphores(p) counters.
  float* dq_accum = nullptr;
  int64_t dq_splits = 1;
  int32_t* dq_semaphores = nullptr;
  // v2's key tiles add into dq_accum in turns (deterministic). false (the
  // environment variable DSK_ATTENTION_BWD_UNORDERED=1, read once): in any order,
  // as FlashAttention-2's atomics do, so the bits may change from run to run; a
  // measurement knob (what the turns cost), not an option of the ops.
  bool dq_in_turns = true;
  // v3 adds each dQ block into its accumulator through shared memory with the TMA
  // unit's bulk reductions, a row at a time (FlashAttention-3's dQ path), instead
  // of fp32 atomics from the registers: the same adds in the same order, so the
  // same bits, except where a partial or a sum is subnormal (the atomics flush it
  // to zero). Opt-in (DSK_ATTENTION_BWD_DQ_BULK=1, read once): not yet run on a GPU.
  bool dq_bulk = false;
};

// Sample b's first row and length; the padded layout is varlen with fixed lengths.
struct SeqRange {
  int64_t q_start, q_len, k_start, k_len;
};

DSK_HOST_DEVICE SeqRange seq_range(const AttnParams& p, int64_t b) {
  SeqRange r;
  if (p.cu_seqlens_q) {
    r.q_start = p.cu_seqlens_q[b];
    r.q_len = p.cu_seqlens_q[b + 1] - r.q_start;
    r.k_start = p.cu_seqlens_k[b];
    r.k_len = p.cu_seqlens_k[b + 1] - r.k_start;
  } else {
    r.q_start = b * p.seqlen_q;
    r.q_len = p.seqlen_q;
    r.k_start = b * p.seqlen_k;
    r.k_len = p.seqlen_k;
  }
  return r;
}

// Element offset of query row i (of sample b, head h) in lse.
DSK_HOST_DEVICE int64_t lse_offset(const AttnParams& p, int64_t b, int64_t h, const SeqRange& r, int64_t i) {
  return p.cu_seqlens_q ? h * p.total_q + r.q_start + i : (b * p.Hq + h) * p.seqlen_q + i;
}

// Keys [0, key_limit) of the sample are visible to its query i under the causal
// mask (bottom-right aligned); all k_len of them without it. Before the padding mask.
DSK_HOST_DEVICE int64_t key_limit(const AttnParams& p, const SeqRange& r, int64_t i) {
  if (!p.causal) return r.k_len;
  const int64_t lim = i + r.k_len - r.q_len + 1;
  return lim < 0 ? 0 : (lim > r.k_len ? r.k_len : lim);
}

// The first query of the sample that sees key j under the causal mask (key_limit
// solved for i; may lie before the first query or past the last); 0 without it.
DSK_HOST_DEVICE int64_t first_query_seeing(const AttnParams& p, const SeqRange& r, int64_t j) {
  return p.causal ? j + r.q_len - r.k_len : 0;
}

// The steps of the backward's loop over a key tile's queries (the key-major
// kernels): the query tiles of bm rows that can see key n0 (causal: from the
// first one on), for each query head of the kv head's GQA group. Step it is
// query head hk * group + it / per_head, query tile qt_begin + it % per_head.
struct KeyTileSteps {
  int64_t qt_begin, per_head, n_iter;
};
DSK_HOST_DEVICE KeyTileSteps key_tile_steps(const AttnParams& p, const SeqRange& r, int64_t n0,
                                            int64_t bm, int64_t group) {
  const int64_t first_q = first_query_seeing(p, r, n0);
  const int64_t qt_begin = first_q > 0 ? first_q / bm : 0;
  const int64_t q_tiles = (r.q_len + bm - 1) / bm;
  const int64_t per_head = q_tiles > qt_begin ? q_tiles - qt_begin : 0;
  return {qt_begin, per_head, per_head * group};
}

// CPU (fp32, fp16, bf16 and fp64 data).
void attention_fwd_cpu(const AttnParams& p);
void attention_bwd_cpu(const AttnParams& p);


#ifdef DSK_WITH_CUDA
// Whether the v2 forward covers p (fp16/bf16, D 64 or 128).
bool attention_fwd_v2_supported(const AttnParams& p);
int attention_fwd_v2_cuda(const AttnParams& p, void* stream);
// v3 (sm_90a wgmma, fp16/bf16, D 64 or 128): false, with nothing launched, where
// it cannot run (dtype, D, build or GPU); else the launch's cudaError_t in err.
bool attention_fwd_v3_cuda(const AttnParams& p, void* stream, int& err);
// Whether the v2 backward covers p (fp16/bf16, D 64 or 128, its shared memory
// fits the current device), and how many int32 counters it needs.
bool attention_bwd_v2_supported(const AttnParams& p);
int64_t attention_bwd_v2_semaphores(const AttnParams& p);
int attention_bwd_v2_cuda(const AttnParams& p, void* stream);
// v3 (sm_90a wgmma, fp16/bf16, D 64 or 128): 0 where it cannot run (dtype, D,
// build or GPU), else how many dq accumulators (dq_splits) it adds into.
int64_t attention_bwd_v3_splits(const AttnParams& p);
int attention_bwd_v3_cuda(const AttnParams& p, void* stream);
// Head dims the CUDA kernels are compiled for.
bool cuda_head_dim_supported(int64_t d);
// Launch on `stream` (a cudaStream_t); return the cudaError_t as int.
int attention_fwd_cuda(const AttnParams& p, void* stream);
int attention_bwd_cuda(const AttnParams& p, void* stream);
#endif

}  // namespace dsk::attention
