// bf16 instances of the forward v2 kernel (attention_fwd_v2_kernel.cuh).
#include "attention/attention_fwd_v2_kernel.cuh"

namespace dsk::attention {

int launch_fwd_v2_bf16(const AttnParams& p, cudaStream_t stream) {
  return fwd_v2::launch_any<__nv_bfloat16>(p, stream);
}

}  // namespace dsk::attention
