// Forward v3 launcher (fp16 instances here, bf16 in attention_fwd_v3_bf16_cuda.cu
// so the two compile in parallel). Kernel: attention_fwd_v3_kernel.cuh.
#include "attention/attention_fwd_v3_kernel.cuh"

namespace dsk::attention {

bool launch_fwd_v3_bf16(const AttnParams& p, cudaStream_t stream, cudaError_t& err);

bool attention_fwd_v3_cuda(const AttnParams& p, void* stream, int& err) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (!(p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) || !(p.D == 64 || p.D == 128))
    return false;
  cudaError_t e = cudaSuccess;
  const bool launched = p.dtype == DType::kFloat16 ? fwd_v3::launch_any<__half>(p, s, e)
                                                   : launch_fwd_v3_bf16(p, s, e);
  err = e;
  return launched;
}

}  // namespace dsk::attention
