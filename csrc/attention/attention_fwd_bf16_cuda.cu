// bf16 instances of the forward kernel (attention_fwd_kernel.cuh).
#include "attention/attention_fwd_kernel.cuh"

namespace dsk::attention {

int launch_fwd_bf16(const AttnParams& p, cudaStream_t stream) {
  return launch_fwd_any<__nv_bfloat16>(p, stream);
}

}  // namespace dsk::attention
