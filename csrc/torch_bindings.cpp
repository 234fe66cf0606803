// Every op schema of the library, and its CPU and CUDA implementations.
// Ops are grouped by family; the Python side (deepseek_kernels/ops.py) adds
// fake implementations and autograd.
#include <torch/library.h>

#include "gemm/gemm_api.h"
#include "moe/moe_api.h"
#include "quant/quant_api.h"

// Sizes that can follow the data (a token count, a capacity, a sequence length)
// are SymInt, so torch.compile(dynamic=True) and torch.export keep them
// symbolic instead of specializing the graph on their values; the kernels take
// them as int64_t (the dispatcher converts).
TORCH_LIBRARY(deepseek_kernels, m) {
  // --- quant: blockwise INT8/INT4 quantization (csrc/quant) ---
  // Stochastic rounding without a seed draws from torch's generator.
  m.def(
      "quantize_int8(Tensor x, int block_size=256, *, bool stochastic=False, int? seed=None)"
      " -> (Tensor q, Tensor scales, Tensor nonfinite)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "quantize_int4(Tensor x, int block_size=256, *, bool stochastic=False, int? seed=None)"
      " -> (Tensor q, Tensor scales, Tensor nonfinite)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "dequantize_int8(Tensor q, Tensor scales, int block_size=256, *, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "dequantize_int4(Tensor q, Tensor scales, SymInt numel, int block_size=256, *, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def("dequantize_sum_int8(Tensor q, Tensor scales, int block_size=256) -> Tensor");
  m.def("dequantize_sum_int4(Tensor q, Tensor scales, SymInt numel, int block_size=256) -> Tensor");

  // --- moe: top-k gating, capacity dispatch/combine, dropless permute (csrc/moe) ---
  m.def(
      "moe_topk_gating(Tensor logits, int k, Tensor? correction_bias=None, *, "
      "str scoring='softmax', int n_group=1, int topk_group=1, bool renormalize=True, "
      "float routed_scaling_factor=1.0, SymInt? capacity=None, str drop_policy='position')"
      " -> (Tensor weights, Tensor expert_ids, Tensor slots, Tensor expert_counts, "
      "Tensor routed_counts, Tensor mean_scores)");
  m.def(
      "moe_dispatch(Tensor x, Tensor expert_ids, Tensor slots, SymInt num_experts, SymInt capacity, "
      "Tensor? weights=None) -> Tensor");
  m.def("moe_combine(Tensor expert_out, Tensor expert_ids, Tensor slots, Tensor? weights=None) -> Tensor");
  m.def(
      "moe_permute(Tensor x, Tensor expert_ids, Tensor slots, Tensor expert_counts, "
      "Tensor? weights=None, *, SymInt? num_rows=None)"
      " -> (Tensor packed, Tensor offsets)");
  m.def(
      "moe_unpermute(Tensor packed, Tensor expert_ids, Tensor slots, Tensor offsets, "
      "Tensor? weights=None) -> Tensor");
  // Backward helper: the weights' gradient of combine/unpermute.
  m.def(
      "moe_rows_dot(Tensor rows, Tensor other, Tensor expert_ids, Tensor slots, Tensor row_base, "
      "Tensor? slot_limit, SymInt capacity) -> Tensor");

  // ---- gemm ----
  // Mixed-precision GEMMs (csrc/gemm): weight [N, K] as in nn.Linear.
  m.def(
      "gemm(Tensor a, Tensor weight, Tensor? bias=None, *, str activation='none', "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def("grouped_gemm(Tensor x, Tensor weights, Tensor offsets, *, ScalarType? out_dtype=None) -> Tensor");
  // Backward helper of grouped_gemm: the weights' gradient, [E, N, K].
  m.def("grouped_gemm_wgrad(Tensor dy, Tensor x, Tensor offsets, SymInt num_groups) -> Tensor");
  m.def("quantize_int8_rowwise(Tensor x) -> (Tensor q, Tensor scales)");
  m.def(
      "int8_gemm(Tensor a, Tensor a_scales, Tensor w, Tensor w_scales, Tensor? bias=None, *, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def("quantize_fp8(Tensor x, int[] block=[1, 128]) -> (Tensor q, Tensor scales)");
  m.def(
      "fp8_gemm(Tensor a, Tensor a_scales, Tensor w, Tensor w_scales, *, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "fp8_grouped_gemm(Tensor a, Tensor a_scales, Tensor w, Tensor w_scales, Tensor offsets, *, "
      "ScalarType? out_dtype=None) -> Tensor");
}

// The host glue branches on the tensors' device (one validation path for
// both); each dispatch key registers it so other backends get a clear
// "not implemented" from the dispatcher.
#define DSK_REGISTER_QUANT(m)                                      \
  m.impl("quantize_int8", &dsk::quant::quantize_int8);             \
  m.impl("quantize_int4", &dsk::quant::quantize_int4);             \
  m.impl("dequantize_int8", &dsk::quant::dequantize_int8);         \
  m.impl("dequantize_int4", &dsk::quant::dequantize_int4);         \
  m.impl("dequantize_sum_int8", &dsk::quant::dequantize_sum_int8); \
  m.impl("dequantize_sum_int4", &dsk::quant::dequantize_sum_int4);

#define DSK_REGISTER_MOE(m)                            \
  m.impl("moe_topk_gating", &dsk::moe::moe_topk_gating); \
  m.impl("moe_dispatch", &dsk::moe::moe_dispatch);       \
  m.impl("moe_combine", &dsk::moe::moe_combine);         \
  m.impl("moe_permute", &dsk::moe::moe_permute);         \
  m.impl("moe_unpermute", &dsk::moe::moe_unpermute);     \
  m.impl("moe_rows_dot", &dsk::moe::moe_rows_dot);

// ---- gemm ----
#define DSK_REGISTER_GEMM(m)                                                \
  m.impl("gemm", &dsk::gemm::gemm);                                         \
  m.impl("grouped_gemm", &dsk::gemm::grouped_gemm);                         \
  m.impl("grouped_gemm_wgrad", &dsk::gemm::grouped_gemm_wgrad);             \
  m.impl("quantize_int8_rowwise", &dsk::gemm::quantize_int8_rowwise);       \
  m.impl("int8_gemm", &dsk::gemm::int8_gemm);                               \
  m.impl("quantize_fp8", &dsk::gemm::quantize_fp8);                         \
  m.impl("fp8_gemm", &dsk::gemm::fp8_gemm);                                 \
  m.impl("fp8_grouped_gemm", &dsk::gemm::fp8_grouped_gemm);

TORCH_LIBRARY_IMPL(deepseek_kernels, CPU, m) {
  DSK_REGISTER_QUANT(m)
  DSK_REGISTER_MOE(m)
  DSK_REGISTER_GEMM(m)
}

#ifdef DSK_WITH_CUDA
TORCH_LIBRARY_IMPL(deepseek_kernels, CUDA, m) {
  DSK_REGISTER_QUANT(m)
  DSK_REGISTER_MOE(m)
  DSK_REGISTER_GEMM(m)
}
#endif

// ---- attention ----
// Exact FlashAttention-style attention (csrc/attention). The forward ops return
// the log-sum-exp the backward ops recompute the probabilities from; autograd
// and the `return_lse` switch live in deepseek_kernels/ops.py.
#include "attention/attention_api.h"

TORCH_LIBRARY_FRAGMENT(deepseek_kernels, m) {
  m.def(
      "cross_attention(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, "
      "Tensor? key_padding_mask=None, bool causal=False) -> (Tensor out, Tensor lse)");
  m.def(
      "cross_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, float? softmax_scale=None, Tensor? key_padding_mask=None, "
      "bool causal=False) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "cross_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float? softmax_scale=None, "
      "bool causal=False) -> (Tensor out, Tensor lse)");
  m.def(
      "cross_attention_varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
      "SymInt max_seqlen_k, float? softmax_scale=None, bool causal=False)"
      " -> (Tensor dq, Tensor dk, Tensor dv)");
}

#define DSK_REGISTER_ATTENTION(m)                                                  \
  m.impl("cross_attention", &dsk::attention::cross_attention);                     \
  m.impl("cross_attention_backward", &dsk::attention::cross_attention_backward);   \
  m.impl("cross_attention_varlen", &dsk::attention::cross_attention_varlen);       \
  m.impl("cross_attention_varlen_backward", &dsk::attention::cross_attention_varlen_backward);

TORCH_LIBRARY_IMPL(deepseek_kernels, CPU, m) { DSK_REGISTER_ATTENTION(m) }

#ifdef DSK_WITH_CUDA
TORCH_LIBRARY_IMPL(deepseek_kernels, CUDA, m) { DSK_REGISTER_ATTENTION(m) }
#endif
