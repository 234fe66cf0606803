// How the library was built, for deepseek_kernels.build_info() and C++ users.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dsk {

// (key, value) pairs; values are strings, "true"/"false" for flags.
std::vector<std::pair<std::string, std::string>> build_info();

// Whether the CUDA kernels were compiled for `arch` (e.g. "sm_90a"): the names
// build_info() lists under cuda_archs. No allocation: the ops ask on every call.
bool built_for_cuda_arch(std::string_view arch);

}  // namespace dsk
