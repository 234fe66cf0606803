// Forward v2 launcher (fp16 instances here, bf16 in attention_fwd_v2_bf16_cuda.cu
// so the two compile in parallel). Kernel: attention_fwd_v2_kernel.cuh.
#include "attention/attention_fwd_v2_kernel.cuh"

namespace dsk::attention {

int launch_fwd_v2_bf16(const AttnParams& p, cudaStream_t stream);

bool attention_fwd_v2_supported(const AttnParams& p) {
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && (p.D == 64 || p.D == 128);
}

int attention_fwd_v2_cuda(const AttnParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.B == 0 || p.seqlen_q == 0 || p.Hq == 0) return cudaSuccess;
  return p.dtype == DType::kFloat16 ? fwd_v2::launch_any<__half>(p, s) : launch_fwd_v2_bf16(p, s);
}

}  // namespace dsk::attention
