// bf16 instances of the forward v3 kernel (attention_fwd_v3_kernel.cuh).
#include "attention/attention_fwd_v3_kernel.cuh"

namespace dsk::attention {

bool launch_fwd_v3_bf16(const AttnParams& p, cudaStream_t stream, cudaError_t& err) {
  return fwd_v3::launch_any<__nv_bfloat16>(p, stream, err);
}

}  // namespace dsk::attention
