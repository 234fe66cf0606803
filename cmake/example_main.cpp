// dsk_smoke: calls deepseek_kernels ops from C++ through torch's dispatcher,
// the way a libtorch program would, without including any header of the
// library. Built with -DDSK_BUILD_EXAMPLES=ON (see docs/cmake.md).
//
//   dsk_smoke [n] [cpu|cuda]
//
// Quantizes n standard-normal floats to INT8 (block 256), dequantizes them,
// prints the first codes and scales and checks the round-trip error
// (|x - dq| <= scale / 2 per element). Exit status 0 when the check passes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <tuple>

namespace {

using QuantizeFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, int64_t, bool, std::optional<int64_t>);
using DequantizeFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                std::optional<at::ScalarType>);

c10::OperatorHandle find_op(const char* name) {
  auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!handle.has_value()) {
    std::cerr << "dsk_smoke: operator " << name << " is not registered: is "
              << "libdeepseek_kernels.so linked (with --no-as-needed) or loaded?\n";
    std::exit(2);
  }
  return *handle;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::stoll(argv[1]) : 1000;
  const std::string device_name = argc > 2 ? argv[2] : "cpu";
  const int64_t block_size = 256;

  at::Device device(at::kCPU);
  if (device_name == "cuda") {
    if (!at::hasCUDA()) {
      std::cerr << "dsk_smoke: no CUDA device (or torch_cuda not loaded)\n";
      return 2;
    }
    device = at::Device(at::kCUDA, 0);
  } else if (device_name != "cpu") {
    std::cerr << "usage: dsk_smoke [n] [cpu|cuda]\n";
    return 2;
  }

  auto quantize = find_op("deepseek_kernels::quantize_int8").typed<QuantizeFn>();
  auto dequantize = find_op("deepseek_kernels::dequantize_int8").typed<DequantizeFn>();
  std::cout << "schema: " << find_op("deepseek_kernels::quantize_int8").schema() << "\n";

  at::manual_seed(0);
  at::Tensor x = at::randn({n}).to(device);
  auto [q, scales, nonfinite] = quantize.call(x, block_size, /*stochastic=*/false, std::nullopt);
  at::Tensor dq = dequantize.call(q, scales, block_size, std::nullopt);

  at::Tensor scale_per_element =
      scales.repeat_interleave(block_size).slice(0, 0, n).to(at::kCPU);
  at::Tensor err = (x.to(at::kCPU) - dq.to(at::kCPU)).abs();
  const bool ok = (err <= scale_per_element * 0.5f + 1e-7f).all().item<bool>() &&
                  !nonfinite.item<bool>();

  std::cout << "device: " << x.device() << ", n = " << n << "\n"
            << "q (first 8): " << q.slice(0, 0, 8).to(at::kCPU) << "\n"
            << "scales: " << scales.to(at::kCPU) << "\n"
            << "nonfinite: " << nonfinite.item<bool>() << "\n"
            << "max |x - dequantize(q)|: " << err.max().item<float>() << "\n"
            << (ok ? "OK" : "FAILED: round-trip error above scale / 2") << std::endl;
  return ok ? 0 : 1;
}
