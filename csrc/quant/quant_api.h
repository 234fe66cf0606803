// Torch-facing entry points of the quantization family (registered in
// csrc/torch_bindings.cpp). Semantics: quant_params.h and deepseek_kernels/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace dsk::quant {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x,
                                                             int64_t block_size, bool stochastic,
                                                             std::optional<int64_t> seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& x,
                                                             int64_t block_size, bool stochastic,
                                                             std::optional<int64_t> seed);
at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                           std::optional<at::ScalarType> out_dtype);
at::Tensor dequantize_int4(const at::Tensor& q, const at::Tensor& scales, int64_t numel,
                           int64_t block_size, std::optional<at::ScalarType> out_dtype);
at::Tensor dequantize_sum_int8(const at::Tensor& q, const at::Tensor& scales, int64_t block_size);
at::Tensor dequantize_sum_int4(const at::Tensor& q, const at::Tensor& scales, int64_t numel,
                               int64_t block_size);

}  // namespace dsk::quant
