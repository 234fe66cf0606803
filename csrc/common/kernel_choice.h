#pragma once
// The CUDA kernel generation new calls get, for op families that keep a first
// kernel and a faster one side by side: taken from an environment variable on
// first use, switched at run time by a private op (tests, the benchmarks' A/B).
// The chosen value travels to the kernels in the family's params struct.

#include <atomic>
#include <cstdint>

namespace dsk {

class KernelChoice {
 public:
  // Values 1..max_version name a generation, spelled "v2" or "2" in the variable;
  // auto_value, when not 0, is one more value, spelled "auto". An unset or empty
  // variable gives default_value; anything else is an error naming the variable.
  KernelChoice(const char* env, int default_value, int max_version, int auto_value = 0);

  int get() const { return value_.load(std::memory_order_relaxed); }

  // The private op: 0 only asks, another valid value selects it for later calls.
  // Returns the previous choice.
  int64_t switch_to(const char* op, int64_t version);

 private:
  int max_value() const { return auto_value_ > max_version_ ? auto_value_ : max_version_; }

  int max_version_, auto_value_;
  std::atomic<int> value_;  // atomic: a switch from another thread is well defined
};

// Whether environment variable `name` is set to exactly `value` (the on/off knobs
// beside the kernel choices, e.g. DSK_FP8_TMA=1; callers read it once).
bool env_equals(const char* name, const char* value);

// The CUDA kernel generation a family's last launch ran, after fallbacks (a
// forced generation that cannot run on the GPU at hand runs an older one
// without a word): noted by the launchers, read through the private op
// _cuda_kernel_ran(family) by the tests and benchmarks. 0 before any launch.
// The *V3Variant families hold which opt-in variant the last v3 launch of the
// GEMM / FP8 family ran, as V3Variant bits (0: cp.async copies);
// kAttentionBwdV3Variant the last backward v3 launch's (1: dQ by bulk reductions).
enum class LaunchedFamily : int {
  kGemm = 0, kFp8Gemm, kInt8Gemm, kAttentionFwd, kAttentionBwd, kGemmV3Variant, kFp8V3Variant,
  kAttentionBwdV3Variant, kCount
};
void note_kernel_ran(LaunchedFamily family, int generation);
enum V3Variant : int {
  kV3Tma = 1, kV3Cluster = 2, kV3Deep = 4, kV3WarpSpecialized = 8, kV3FmaPromotion = 16, kV3WsWarpArrivals = 32
};

}  // namespace dsk
