// Torch-facing entry points of the GEMM family (registered in
// csrc/torch_bindings.cpp). Semantics: gemm_params.h and deepseek_kernels/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace dsk::gemm {

at::Tensor gemm(const at::Tensor& a, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::string& activation, std::optional<at::ScalarType> out_dtype);
at::Tensor grouped_gemm(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& offsets,
                        std::optional<at::ScalarType> out_dtype);
// Backward helper: dw[g] = dy[rows of g]^T @ x[rows of g], [E, N, K].
at::Tensor grouped_gemm_wgrad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets,
                              int64_t num_groups);
std::tuple<at::Tensor, at::Tensor> quantize_int8_rowwise(const at::Tensor& x);
at::Tensor int8_gemm(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& w,
                     const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                     std::optional<at::ScalarType> out_dtype);
std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, at::IntArrayRef block);
at::Tensor fp8_gemm(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& w,
                    const at::Tensor& w_scales, std::optional<at::ScalarType> out_dtype);
at::Tensor fp8_grouped_gemm(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& w,
                            const at::Tensor& w_scales, const at::Tensor& offsets,
                            std::optional<at::ScalarType> out_dtype);

}  // namespace dsk::gemm
