// Backward v2 launcher (fp16 instances here, bf16 in attention_bwd_v2_bf16_cuda.cu
// so the two compile in parallel). Kernels: attention_bwd_v2_kernel.cuh.
#include <climits>

#include "attention/attention_bwd_v2_kernel.cuh"

namespace dsk::attention {

int launch_bwd_v2_bf16(const AttnParams& p, cudaStream_t stream);

bool attention_bwd_v2_supported(const AttnParams& p) {
  if (!(p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) || !(p.D == 64 || p.D == 128))
    return false;
  // One CTA per (key tile, kv head, sample) on a 1-D grid; its ticket is an int.
  const int64_t ctas = (p.seqlen_k + bwd_v2::kBlockN - 1) / bwd_v2::kBlockN * p.Hkv * p.B;
  if (ctas > INT_MAX || attention_bwd_v2_semaphores(p) > INT_MAX) return false;
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return false;
  const size_t need = p.D == 64 ? bwd_v2::smem_bytes<__half, 64>() : bwd_v2::smem_bytes<__half, 128>();
  // + the kernel's static shared memory (the ticket int: ptxas reserves 16 bytes);
  // e.g. false on sm_86/89 (99 KB) at D = 128.
  return static_cast<size_t>(optin) >= need + 16;
}

int64_t attention_bwd_v2_semaphores(const AttnParams& p) { return bwd_v2::semaphore_count(p); }

int attention_bwd_v2_cuda(const AttnParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p.dtype == DType::kFloat16 ? bwd_v2::launch_any<__half>(p, s) : launch_bwd_v2_bf16(p, s);
}

}  // namespace dsk::attention
