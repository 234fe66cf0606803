// CUDA helpers for .cu files (no torch headers): vector types, cp.async,
// warp reductions, grid sizing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dsk {

// VEC elements of T, aligned for one vector memory access (at most 16 bytes
// per instruction; larger structs split into several 16-byte accesses).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC > 16 ? 16 : sizeof(T) * VEC) Vec {
  T v[VEC];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ uint32_t shared_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared (sm_80+), bypassing L1; with valid == false
// the destination is zero-filled and nothing is read (src must still be mapped).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Until at most PENDING of this thread's committed copy groups are in flight.
// The "memory" clobber keeps the compiler from moving shared-memory reads of the
// landed data above the wait (every caller also has a barrier after it today).
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
  return __reduce_max_sync(0xffffffffu, v);
}

// Number of multiprocessors of the current device, cached per device.
int multiprocessor_count();

// Programmatic dependent launch (sm_90+): a kernel launched by launch_dependent
// with `dependent` true may start while the stream's previous kernel finishes
// (its launch overlaps the other's tail). Such a kernel must call
// wait_for_preceding_grid() before its first global memory access: it returns
// once the previous kernel has completed and its writes are visible (at once for
// a kernel launched the usual way, and below sm_90).
__device__ __forceinline__ void wait_for_preceding_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Whether the current device can launch dependent kernels early (cc 9.0+), cached.
bool device_has_dependent_launch();

// `kernel` launched with one launch attribute (cudaLaunchKernelEx).
template <typename... Params, typename... Args>
cudaError_t launch_with_attribute(const cudaLaunchAttribute& attr, void (*kernel)(Params...), dim3 grid,
                                  dim3 block, size_t smem, cudaStream_t stream, const Args&... args) {
  cudaLaunchAttribute attrs[1] = {attr};
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

template <typename... Params, typename... Args>
cudaError_t launch_dependent(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block,
                             size_t smem, cudaStream_t stream, Args... args) {
  if (!dependent) {  // the usual launch
    kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return launch_with_attribute(attr, kernel, grid, block, smem, stream, args...);
}

// A grid of at most `waves` blocks per multiprocessor (kernels use grid-stride
// loops), and at least one block.
inline int64_t grid_size(int64_t work_items, int64_t threads_per_block, int64_t waves = 16) {
  int64_t blocks = (work_items + threads_per_block - 1) / threads_per_block;
  const int64_t cap = static_cast<int64_t>(multiprocessor_count()) * waves;
  if (blocks > cap) blocks = cap;
  return blocks < 1 ? 1 : blocks;
}

}  // namespace dsk
