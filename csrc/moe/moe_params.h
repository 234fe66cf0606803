// Plain parameter structs and launchers for MoE routing. Filled by moe_api.cpp
// (which validates the tensors); CPU kernels in moe_cpu.cpp, CUDA kernels in
// moe_cuda.cu, the fp32 arithmetic they share in moe_math.h.
//
// Gating contract (bitwise, shared with deepseek_kernels/reference.py):
//   scores p: softmax (exp(x - max) / sum, the sum as 32 strided partial sums
//     e = l, l+32, ... then halved 16, 8, 4, 2, 1) or sigmoid, in fp32
//     (fp64 for fp64 logits, CPU only); exp is moe_math.h's exp_nonpos.
//   selection score = p + bias; group-limited routing keeps the topk_group groups
//     with the largest (best + second best) selection score; top-k among their
//     experts, descending, ties to the lower index (groups: lower group index).
//   weights = p of the chosen experts, / their sequential sum when renormalize
//     and the sum is > 0, * routed_scaling_factor.
//   a row with a non-finite logit (or a non-finite bias) is not routed:
//     ids -1, weights 0, slots -1, no counts, no score mass.
//   rank of choice (t, j) = routed choices to its expert from earlier tokens;
//     slots: dropless = rank; "position" keeps rank < capacity; "probability"
//     keeps the capacity largest weights per expert (ties: earlier token) and
//     numbers the kept ones in token order.
//   mean_scores[e] = S / T; chunk c (8 tokens) has the sequential sum of its p;
//     lane l < 256 sums chunks l, l + 256, ... sequentially; S = the 256 lanes
//     halved (l and l + 128, then 64, ..., 1).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dsk::moe {

// Limits moe_api.cpp enforces (the kernels size per-row scratch by them).
constexpr int64_t kMaxExperts = 1024;
constexpr int kMaxK = 16;

struct GatingParams {
  const void* logits = nullptr;  // [T, E] contiguous, dtype logits_dtype
  DType logits_dtype = DType::kFloat32;
  const void* bias = nullptr;  // [E] in the compute dtype (fp32, fp64 for fp64 logits), or null
  bool bias_finite = true;     // CPU: computed by the kernel; CUDA: checked per row
  int64_t T = 0, E = 0, k = 1, n_group = 1, topk_group = 1;
  bool softmax = true;
  bool renormalize = true;
  double routed_scaling_factor = 1.0;
  int64_t capacity = -1;  // -1: dropless
  bool drop_probability = false;
  // outputs (compute dtype for weights and mean_scores)
  void* weights = nullptr;         // [T, k]
  int32_t* expert_ids = nullptr;   // [T, k]
  int32_t* slots = nullptr;        // [T, k]
  int32_t* expert_counts = nullptr;  // [E]
  int32_t* routed_counts = nullptr;  // [E]
  void* mean_scores = nullptr;       // [E]
  void* workspace = nullptr;         // CUDA only: gating_workspace_bytes(T, E, k) bytes
  // CUDA kernel generation: 1 or 2 (the default: fewer instructions per token,
  // bitwise the same results). Filled by the glue from
  // DSK_MOE_KERNEL (v1/1 or v2/2, read once) or the private op _moe_cuda_kernel.
  int cuda_kernel = 1;
  // CUDA: launch the kernels after the first as programmatic dependent launches
  // (sm_90+; cuda_utils.cuh), so each one's launch overlaps the previous one's
  // tail. Opt-in (DSK_MOE_PDL=1, read once by the glue): passes its tests on an H100, not yet benchmarked.
  bool dependent_launch = false;
};

// Rows of expert-major buffers: choice (t, j) with expert e and slot s >= 0 is
// row row_base[e] + s (row_base null: e * capacity), s < (slot_limit ? slot_limit[e] : capacity).
struct RowsParams {
  const void* src = nullptr;
  void* dst = nullptr;
  DType dtype = DType::kFloat32;   // of src and dst
  const int32_t* expert_ids = nullptr;  // [T, k]
  const int32_t* slots = nullptr;       // [T, k]
  const void* weights = nullptr;        // [T, k] fp32 (fp64 with fp64 data) or null (weight 1)
  const int64_t* row_base = nullptr;    // [E], or null for e * capacity
  const int32_t* slot_limit = nullptr;  // [E] or null
  int64_t capacity = 0;
  int64_t T = 0, k = 1, H = 0, E = 0;
  int64_t dst_rows = 0;  // scatter: rows of dst
  // gather, rows_dot: rows of src. The CUDA kernels skip a choice whose row is at
  // or past it, as any out-of-range choice there: offsets and row_base are read on
  // the host (and checked) on the CPU only.
  int64_t src_rows = INT64_MAX;
  int64_t* row_map = nullptr;  // CUDA scatter: [dst_rows] workspace, filled with -1 by the caller
                               // (then the largest choice index naming each row)
  const void* other = nullptr;  // rows_dot: [T, H], dtype of src
};

// Returns -1, or the flat index (t * k + j) of a choice whose expert id or slot
// is out of range (the CPU kernels check; the CUDA kernels skip such choices).
int64_t gating_cpu(const GatingParams& p);
// dst[row(t, j)] = (w *) src[t] for kept choices, every other row of dst zero:
// a map dst row -> choice, then every dst row written exactly once.
int64_t scatter_rows_cpu(const RowsParams& p);
// dst[t] = sum over kept j = 0..k-1 of (w *) src[row(t, j)], in the compute dtype.
int64_t gather_rows_cpu(const RowsParams& p);
// dst[t, j] (compute dtype) = <other[t], src[row(t, j)]>, 0 when dropped: 32
// strided partial sums h = l, l + 32, ... then halved 16, 8, 4, 2, 1.
int64_t rows_dot_cpu(const RowsParams& p);

#ifdef DSK_WITH_CUDA
int64_t gating_workspace_bytes(int64_t T, int64_t E, int64_t k);
// Launch on `stream` (a cudaStream_t); return the cudaError_t as int.
int gating_cuda(const GatingParams& p, void* stream);
int scatter_rows_cuda(const RowsParams& p, void* stream);
int gather_rows_cuda(const RowsParams& p, void* stream);
int rows_dot_cuda(const RowsParams& p, void* stream);
#endif

}  // namespace dsk::moe
