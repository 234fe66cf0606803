// Torch-facing entry points of the MoE routing family (registered in
// csrc/torch_bindings.cpp). Semantics: moe_params.h and deepseek_kernels/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace dsk::moe {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_topk_gating(const at::Tensor& logits, int64_t k,
                const std::optional<at::Tensor>& correction_bias, c10::string_view scoring,
                int64_t n_group,
                int64_t topk_group, bool renormalize, double routed_scaling_factor,
                std::optional<int64_t> capacity, c10::string_view drop_policy);

at::Tensor moe_dispatch(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& slots,
                        int64_t num_experts, int64_t capacity,
                        const std::optional<at::Tensor>& weights);
at::Tensor moe_combine(const at::Tensor& expert_out, const at::Tensor& expert_ids,
                       const at::Tensor& slots, const std::optional<at::Tensor>& weights);
std::tuple<at::Tensor, at::Tensor> moe_permute(const at::Tensor& x, const at::Tensor& expert_ids,
                                               const at::Tensor& slots,
                                               const at::Tensor& expert_counts,
                                               const std::optional<at::Tensor>& weights,
                                               std::optional<int64_t> num_rows);
at::Tensor moe_unpermute(const at::Tensor& packed, const at::Tensor& expert_ids,
                         const at::Tensor& slots, const at::Tensor& offsets,
                         const std::optional<at::Tensor>& weights);

// d weights of combine/unpermute (and of weighted dispatch/permute):
// out[t, j] = <other[t], rows[row_base[e] + slot]>, 0 when dropped.
at::Tensor moe_rows_dot(const at::Tensor& rows, const at::Tensor& other,
                        const at::Tensor& expert_ids, const at::Tensor& slots,
                        const at::Tensor& row_base, const std::optional<at::Tensor>& slot_limit,
                        int64_t capacity);

}  // namespace dsk::moe
