// DSK_HOST_DEVICE: functions shared by the CPU kernels (plain C++) and the
// CUDA kernels, so both compute exactly the same thing.
#pragma once

#if defined(__CUDACC__)
#define DSK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DSK_HOST_DEVICE inline
#endif
