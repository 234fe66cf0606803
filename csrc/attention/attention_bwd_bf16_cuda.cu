// bf16 instances of the backward kernels (attention_bwd_kernel.cuh).
#include "attention/attention_bwd_kernel.cuh"

namespace dsk::attention {

int launch_bwd_bf16(const AttnParams& p, cudaStream_t stream) {
  return launch_bwd_any<__nv_bfloat16>(p, stream);
}

}  // namespace dsk::attention
