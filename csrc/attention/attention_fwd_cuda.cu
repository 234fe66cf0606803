// Forward launcher (fp16 instances here, bf16 in attention_fwd_bf16_cuda.cu so
// the two compile in parallel). Kernel: attention_fwd_kernel.cuh.
#include "attention/attention_fwd_kernel.cuh"
#include "common/kernel_choice.h"

namespace dsk::attention {

int launch_fwd_bf16(const AttnParams& p, cudaStream_t stream);

bool cuda_head_dim_supported(int64_t d) {
  return d == 16 || d == 32 || d == 64 || d == 96 || d == 128 || d == 256;
}

int attention_fwd_cuda(const AttnParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.B == 0 || p.seqlen_q == 0 || p.Hq == 0) return cudaSuccess;
  if (p.fwd_kernel == 3 || (p.fwd_kernel == kAttentionFwdAuto && p.D == 128)) {
    int err = cudaSuccess;
    if (attention_fwd_v3_cuda(p, stream, err)) {
      note_kernel_ran(LaunchedFamily::kAttentionFwd, 3);
      return err;
    }
  }
  const bool v2 = p.fwd_kernel >= 2 && attention_fwd_v2_supported(p);  // v3 and auto fall back to v2
  note_kernel_ran(LaunchedFamily::kAttentionFwd, v2 ? 2 : 1);
  if (v2) return attention_fwd_v2_cuda(p, stream);
  return p.dtype == DType::kFloat16 ? launch_fwd_any<__half>(p, s) : launch_fwd_bf16(p, s);
}

}  // namespace dsk::attention
