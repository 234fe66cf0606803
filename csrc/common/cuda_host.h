// CUDA helpers for the host glue (.cpp files that see torch tensors): the
// stream a family's launcher runs on. Kernels (.cu) take it as a plain pointer.
#pragma once

#ifdef DSK_WITH_CUDA
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace dsk {

// The current CUDA stream of t's device, as the cudaStream_t the launchers take.
inline void* stream_of(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

}  // namespace dsk
#endif
