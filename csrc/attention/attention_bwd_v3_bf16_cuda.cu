// bf16 instances of the backward v3 kernel (attention_bwd_v3_kernel.cuh).
#include "attention/attention_bwd_v3_kernel.cuh"

namespace dsk::attention {

int64_t bwd_v3_splits_bf16(const AttnParams& p) { return bwd_v3::usable_splits_any<__nv_bfloat16>(p); }

int launch_bwd_v3_bf16(const AttnParams& p, cudaStream_t stream) {
  return bwd_v3::launch_any<__nv_bfloat16>(p, stream);
}

}  // namespace dsk::attention
