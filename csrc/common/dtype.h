// Plain dtype tag shared by host glue and kernels: kernels never see torch
// tensors or torch types, only raw pointers and this enum.
#pragma once

namespace dsk {

// kFloat64 only where an op supports it on the CPU (e.g. for gradcheck).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace dsk
