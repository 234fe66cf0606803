// Backward launcher (fp16 instances here, bf16 in attention_bwd_bf16_cuda.cu).
// Kernels: attention_bwd_kernel.cuh.
#include "attention/attention_bwd_kernel.cuh"
#include "common/kernel_choice.h"

namespace dsk::attention {

int launch_bwd_bf16(const AttnParams& p, cudaStream_t stream);

int attention_bwd_cuda(const AttnParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.B == 0 || p.Hq == 0) return cudaSuccess;
  note_kernel_ran(LaunchedFamily::kAttentionBwd, p.bwd_kernel);
  if (p.bwd_kernel == 3) {  // the glue chose it
    note_kernel_ran(LaunchedFamily::kAttentionBwdV3Variant, p.dq_bulk ? 1 : 0);
    return attention_bwd_v3_cuda(p, stream);
  }
  if (p.bwd_kernel == 2) return attention_bwd_v2_cuda(p, stream);
  return p.dtype == DType::kFloat16 ? launch_bwd_any<__half>(p, s) : launch_bwd_bf16(p, s);
}

}  // namespace dsk::attention
