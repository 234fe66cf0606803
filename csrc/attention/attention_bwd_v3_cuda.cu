// Backward v3 launcher (fp16 instances here, bf16 in attention_bwd_v3_bf16_cuda.cu
// so the two compile in parallel). Kernel: attention_bwd_v3_kernel.cuh.
#include "attention/attention_bwd_v3_kernel.cuh"

namespace dsk::attention {

int64_t bwd_v3_splits_bf16(const AttnParams& p);
int launch_bwd_v3_bf16(const AttnParams& p, cudaStream_t stream);

int64_t attention_bwd_v3_splits(const AttnParams& p) {
  if (p.dtype == DType::kFloat16) return bwd_v3::usable_splits_any<__half>(p);
  return p.dtype == DType::kBFloat16 ? bwd_v3_splits_bf16(p) : 0;
}

int attention_bwd_v3_cuda(const AttnParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p.dtype == DType::kFloat16 ? bwd_v3::launch_any<__half>(p, s) : launch_bwd_v3_bf16(p, s);
}

}  // namespace dsk::attention
