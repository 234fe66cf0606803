// Torch-facing entry points of the attention family (registered in
// csrc/torch_bindings.cpp). Semantics: attention_params.h and deepseek_kernels/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace dsk::attention {

// q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] -> (out [B, Lq, Hq, D], lse [B, Hq, Lq]).
std::tuple<at::Tensor, at::Tensor> cross_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    std::optional<double> softmax_scale, const std::optional<at::Tensor>& key_padding_mask,
    bool causal);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> softmax_scale,
    const std::optional<at::Tensor>& key_padding_mask, bool causal);

// q [total_q, Hq, D], k/v [total_k, Hkv, D] -> (out [total_q, Hq, D], lse [Hq, total_q]).
std::tuple<at::Tensor, at::Tensor> cross_attention_varlen(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_varlen_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    std::optional<double> softmax_scale, bool causal);

}  // namespace dsk::attention
