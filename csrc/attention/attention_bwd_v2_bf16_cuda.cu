// bf16 instances of the backward v2 kernels (attention_bwd_v2_kernel.cuh).
#include "attention/attention_bwd_v2_kernel.cuh"

namespace dsk::attention {

int launch_bwd_v2_bf16(const AttnParams& p, cudaStream_t stream) {
  return bwd_v2::launch_any<__nv_bfloat16>(p, stream);
}

}  // namespace dsk::attention
