// Plain dtype tag shared by host glue and kernels: kernels never see torch
// tensors or torch types, only raw pointers and this enum.
#pragma once

namespace dsk {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace dsk
