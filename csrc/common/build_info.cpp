#include "common/build_info.h"

#include <ATen/Parallel.h>
#include <torch/version.h>

#ifdef DSK_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef DSK_CUDA_ARCHS
#define DSK_CUDA_ARCHS ""
#endif
#ifndef DSK_BUILD_SYSTEM
#define DSK_BUILD_SYSTEM "unknown"
#endif

namespace dsk {

std::vector<std::pair<std::string, std::string>> build_info() {
  std::vector<std::pair<std::string, std::string>> info;
  info.emplace_back("torch_version", TORCH_VERSION);
#ifdef DSK_WITH_CUDA
  info.emplace_back("cuda_kernels", "true");
  info.emplace_back("cuda_version",
                    std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10));
  info.emplace_back("cuda_archs", DSK_CUDA_ARCHS);
#else
  info.emplace_back("cuda_kernels", "false");
  info.emplace_back("cuda_version", "");
  info.emplace_back("cuda_archs", "");
#endif
  // The CPU kernels run on several threads when compiled with OpenMP and
  // torch's parallel backend is OpenMP.
#if defined(_OPENMP)
  info.emplace_back("openmp", AT_PARALLEL_OPENMP ? "true" : "false");
#else
  info.emplace_back("openmp", "false");
#endif
  info.emplace_back("cpu_threads", std::to_string(at::get_num_threads()));
  info.emplace_back("build_system", DSK_BUILD_SYSTEM);
  return info;
}

bool built_for_cuda_arch(std::string_view arch) {
  std::string_view archs = DSK_CUDA_ARCHS;  // "sm_80;sm_90a;compute_80"
  while (!archs.empty()) {
    const size_t end = archs.find(';');
    if (archs.substr(0, end) == arch) return true;
    if (end == std::string_view::npos) break;
    archs.remove_prefix(end + 1);
  }
  return false;
}

}  // namespace dsk
