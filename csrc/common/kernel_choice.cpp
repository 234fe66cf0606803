#include "common/kernel_choice.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <string>

namespace dsk {
namespace {

// "0, 1 or 2" for 0..2; with a prefix per value ("v1 or v2").
std::string value_list(int first, int last, const char* prefix) {
  std::string s;
  for (int v = first; v <= last; ++v) {
    if (v > first) s += v == last ? " or " : ", ";
    s += prefix + std::to_string(v);
  }
  return s;
}

std::array<std::atomic<int>, static_cast<size_t>(LaunchedFamily::kCount)> g_kernel_ran{};

// The private op's family names, in LaunchedFamily order.
constexpr std::array<const char*, static_cast<size_t>(LaunchedFamily::kCount)> kFamilyNames = {
    "gemm", "fp8_gemm", "int8_gemm", "attention_fwd", "attention_bwd", "gemm_v3_variant", "fp8_gemm_v3_variant",
    "attention_bwd_v3_variant"};

int64_t cuda_kernel_ran_op(c10::string_view family) {
  std::string names;
  for (size_t i = 0; i < kFamilyNames.size(); ++i) {
    if (family == kFamilyNames[i]) return g_kernel_ran[i].load(std::memory_order_relaxed);
    names += (i ? ", '" : "'") + std::string(kFamilyNames[i]) + "'";
  }
  TORCH_CHECK_VALUE(false, "_cuda_kernel_ran: argument 'family' must be one of ", names, ", got '",
                    std::string(family), "'");
  return 0;
}

}  // namespace

bool env_equals(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, value) == 0;
}

void note_kernel_ran(LaunchedFamily family, int generation) {
  g_kernel_ran[static_cast<size_t>(family)].store(generation, std::memory_order_relaxed);
}

KernelChoice::KernelChoice(const char* env, int default_value, int max_version, int auto_value)
    : max_version_(max_version), auto_value_(auto_value), value_(default_value) {
  const char* e = std::getenv(env);
  if (e == nullptr || *e == '\0') return;
  const std::string s(e);
  if (auto_value != 0 && s == "auto") {
    value_.store(auto_value);
    return;
  }
  for (int v = 1; v <= max_version; ++v) {
    if (s == std::to_string(v) || s == "v" + std::to_string(v)) {
      value_.store(v);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, env, " must be ", auto_value != 0 ? "auto, " : "",
                    value_list(1, max_version, "v"), ", got '", s, "'");
}

int64_t KernelChoice::switch_to(const char* op, int64_t version) {
  TORCH_CHECK_VALUE(version >= 0 && version <= max_value() &&
                        (version <= max_version_ || version == auto_value_),
                    op, ": argument 'version' must be ", value_list(0, max_value(), ""),
                    ", got ", version);
  const int old = get();
  if (version != 0) value_.store(static_cast<int>(version), std::memory_order_relaxed);
  return old;
}

}  // namespace dsk

// A private knob with no tensor arguments (a catch-all kernel serves every device).
TORCH_LIBRARY_FRAGMENT(deepseek_kernels, m) {
  m.def("_cuda_kernel_ran(str family) -> int", &dsk::cuda_kernel_ran_op);
}
