// Host glue for blockwise INT8/INT4 quantization: validate arguments, allocate
// outputs, fill the params struct and call the CPU or CUDA launcher.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_host.h"
#include "common/kernel_choice.h"
#include "common/rng.h"
#include "quant/quant_api.h"
#include "quant/quant_params.h"

namespace dsk::quant {
namespace {

// DSK_QUANT_KERNEL: v1 or v2 (the default, bitwise equal results), read on first use.
KernelChoice& cuda_kernel_choice() {
  static KernelChoice choice("DSK_QUANT_KERNEL", 2, 2);
  return choice;
}

// A seed for stochastic rounding when the caller gave none: drawn from torch's
// default CPU generator, so torch.manual_seed makes runs reproducible.
uint64_t draw_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
}

void check_block_size(const char* op, int64_t block_size, int bits) {
  check_positive(op, "block_size", block_size);
  TORCH_CHECK_VALUE(bits == 8 || block_size % 2 == 0, op,
                    ": argument 'block_size' must be even for int4 (two codes per byte), got ",
                    block_size);
}

// Contiguous and 16-byte aligned (the CUDA kernels' vector loads need it; a
// misaligned view is rare, e.g. x[1:], and is copied once).
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const char* op, const at::Tensor& x,
                                                        int64_t block_size, int bits,
                                                        bool stochastic,
                                                        std::optional<int64_t> seed) {
  check_supported_device(op, "x", x);
  check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  check_block_size(op, block_size, bits);

  const c10::DeviceGuard guard(x.device());
  const at::Tensor xc = contiguous_aligned(x);
  const int64_t n = xc.numel();
  const int64_t num_blocks = ceil_div(n, block_size);
  const auto opts = xc.options();
  at::Tensor q = bits == 8 ? at::empty({n}, opts.dtype(at::kChar))
                           : at::empty({ceil_div(n, 2)}, opts.dtype(at::kByte));
  at::Tensor scales = at::empty({num_blocks}, opts.dtype(at::kFloat));
  at::Tensor nonfinite = at::zeros({}, opts.dtype(at::kBool));

  QuantizeParams p;
  p.x = xc.data_ptr();
  p.x_dtype = to_dsk_dtype(xc.scalar_type());
  p.q = q.data_ptr();
  p.scales = scales.data_ptr<float>();
  p.nonfinite = nonfinite.data_ptr<bool>();
  p.n = n;
  p.block_size = block_size;
  p.num_blocks = num_blocks;
  p.bits = bits;
  p.stochastic = stochastic;
  p.seed_key = stochastic ? seed_key(seed ? static_cast<uint64_t>(*seed) : draw_seed()) : 0u;
  p.cuda_kernel = cuda_kernel_choice().get();

  if (xc.is_cuda()) {
#ifdef DSK_WITH_CUDA
    C10_CUDA_CHECK(static_cast<cudaError_t>(quantize_cuda(p, stream_of(xc))));
#endif
  } else {
    quantize_cpu(p);
  }
  return {q, scales, nonfinite};
}

at::Tensor dequantize(const char* op, const at::Tensor& q, const at::Tensor& scales,
                      int64_t numel, int64_t block_size, int bits, bool sum_rows,
                      std::optional<at::ScalarType> out_dtype) {
  check_supported_device(op, "q", q);
  check_dtype(op, "q", q, {bits == 8 ? at::kChar : at::kByte});
  check_dtype(op, "scales", scales, {at::kFloat});
  check_same_device(op, "scales", scales, "q", q);
  check_block_size(op, block_size, bits);
  TORCH_CHECK_VALUE(numel >= 0, op, ": argument 'numel' must be non-negative, got ", numel);
  const at::ScalarType dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": argument 'out_dtype' must be one of Float, Half, BFloat16, got ", dtype);

  int64_t rows = 1;
  if (sum_rows) {
    check_dim(op, "q", q, 2);
    check_dim(op, "scales", scales, 2);
    rows = q.size(0);
  }
  const int64_t row_bytes = sum_rows ? q.size(1) : q.numel();
  if (bits == 8) numel = row_bytes;  // int8: one code per byte
  const int64_t expected_bytes = bits == 8 ? numel : ceil_div(numel, 2);
  TORCH_CHECK_VALUE(row_bytes == expected_bytes, op, ": argument 'q' must hold ", expected_bytes,
                    " bytes per row for numel=", numel, ", got ", row_bytes);
  const int64_t num_blocks = ceil_div(numel, block_size);
  if (sum_rows) {
    check_shape(op, "scales", scales, {rows, num_blocks});
  } else {
    TORCH_CHECK_VALUE(scales.numel() == num_blocks, op, ": argument 'scales' must hold ceil(",
                      numel, " / ", block_size, ") = ", num_blocks, " values, got ",
                      scales.numel(), " (shape ", scales.sizes(), ")");
  }

  const c10::DeviceGuard guard(q.device());
  const at::Tensor qc = q.contiguous();
  const at::Tensor sc = scales.contiguous();
  at::Tensor out = at::empty({numel}, q.options().dtype(dtype));

  DequantizeParams p;
  p.q = qc.data_ptr();
  p.scales = sc.data_ptr<float>();
  p.out = out.data_ptr();
  p.out_dtype = to_dsk_dtype(dtype);
  p.n = numel;
  p.block_size = block_size;
  p.num_blocks = num_blocks;
  p.rows = rows;
  p.q_row_stride = row_bytes;
  p.bits = bits;
  p.cuda_kernel = cuda_kernel_choice().get();

  if (rows == 0) return out.zero_();
  if (qc.is_cuda()) {
#ifdef DSK_WITH_CUDA
    C10_CUDA_CHECK(static_cast<cudaError_t>(dequantize_cuda(p, stream_of(qc))));
#endif
  } else {
    dequantize_cpu(p);
  }
  return out;
}

// Private op for the benchmark's A/B: version 1 or 2 selects the CUDA kernels
// for later calls, 0 only asks. Returns the previous choice.
int64_t quant_cuda_kernel_op(int64_t version) {
  return cuda_kernel_choice().switch_to("_quant_cuda_kernel", version);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x,
                                                             int64_t block_size, bool stochastic,
                                                             std::optional<int64_t> seed) {
  return quantize("quantize_int8", x, block_size, 8, stochastic, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& x,
                                                             int64_t block_size, bool stochastic,
                                                             std::optional<int64_t> seed) {
  return quantize("quantize_int4", x, block_size, 4, stochastic, seed);
}

at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scales, int64_t block_size,
                           std::optional<at::ScalarType> out_dtype) {
  return dequantize("dequantize_int8", q, scales, 0 /* from q */, block_size, 8, false,
                    out_dtype);
}

at::Tensor dequantize_int4(const at::Tensor& q, const at::Tensor& scales, int64_t numel,
                           int64_t block_size, std::optional<at::ScalarType> out_dtype) {
  return dequantize("dequantize_int4", q, scales, numel, block_size, 4, false, out_dtype);
}

at::Tensor dequantize_sum_int8(const at::Tensor& q, const at::Tensor& scales,
                               int64_t block_size) {
  return dequantize("dequantize_sum_int8", q, scales, 0 /* from q */, block_size, 8, true,
                    std::nullopt);
}

at::Tensor dequantize_sum_int4(const at::Tensor& q, const at::Tensor& scales, int64_t numel,
                               int64_t block_size) {
  return dequantize("dequantize_sum_int4", q, scales, numel, block_size, 4, true, std::nullopt);
}

}  // namespace dsk::quant

// A fragment here rather than in csrc/torch_bindings.cpp: a private knob of this
// family only, with no tensor arguments (a catch-all kernel serves every device).
TORCH_LIBRARY_FRAGMENT(deepseek_kernels, m) {
  m.def("_quant_cuda_kernel(int version=0) -> int", &dsk::quant::quant_cuda_kernel_op);
}
