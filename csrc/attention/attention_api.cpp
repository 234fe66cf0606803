// Host glue for attention (in the style of FlashAttention's flash_api.cpp):
// validate arguments, allocate outputs, fill AttnParams and call the CPU or
// CUDA launchers. Kernels never see torch tensors.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "attention/attention_api.h"
#include "attention/attention_params.h"
#include "common/build_info.h"
#include "common/checks.h"
#include "common/cuda_host.h"
#include "common/kernel_choice.h"

namespace dsk::attention {
namespace {

constexpr int64_t kMaxHeadDimCpu = 256;

// DSK_ATTENTION_KERNEL: auto (the default, kAttentionFwdAuto), v1, v2 (on an
// H100 1.8-1.9x v1 for D = 64 and 128; other D use v1) or v3 (wgmma, sm_90a),
// read on first use.
KernelChoice& fwd_kernel_choice() {
  static KernelChoice choice("DSK_ATTENTION_KERNEL", kAttentionFwdAuto, 3, kAttentionFwdAuto);
  return choice;
}
// DSK_ATTENTION_BWD_KERNEL: auto (the default, kAttentionBwdAuto: v3, else v1),
// v1, v2 (D 64/128: one pass over the scores, attention_bwd_v2_kernel.cuh) or v3
// (wgmma, sm_90a, D 64/128: attention_bwd_v3_kernel.cuh); where a forced one
// cannot run, the next older one that can. Read on first use.
KernelChoice& bwd_kernel_choice() {
  static KernelChoice choice("DSK_ATTENTION_BWD_KERNEL", kAttentionBwdAuto, 3, kAttentionBwdAuto);
  return choice;
}
constexpr const char* kCudaHeadDims = "16, 32, 64, 96, 128, 256";

// q, k, v: supported device and dtype, the same for all three, the given rank.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               int64_t dim) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    check_supported_device(op, name, *t);
    check_dtype(op, name, *t, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    check_dim(op, name, *t, dim);
  }
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": arguments 'q', 'k', 'v' must share a dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), ", ", v.scalar_type());
  if (q.is_cuda()) {
    TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                     ": CUDA kernels take float16 or bfloat16 'q', 'k', 'v', got ",
                     q.scalar_type(), " (fp32/fp64 run on the CPU only)");
  }
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": arguments 'k' and 'v' must have the same shape, got ",
                    k.sizes(), " and ", v.sizes());
  const int64_t Hq = q.size(-2), Hkv = k.size(-2), D = q.size(-1);
  TORCH_CHECK_VALUE(k.size(-1) == D, op, ": arguments 'q' and 'k' must have the same head dim, got ",
                    D, " and ", k.size(-1));
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq >= 1 && Hq % Hkv == 0, op,
                    ": the query heads (", Hq, ", dim -2 of 'q') must be a positive multiple of "
                    "the key/value heads (", Hkv, ", dim -2 of 'k')");
  if (q.is_cuda()) {
#ifdef DSK_WITH_CUDA
    TORCH_CHECK_VALUE(cuda_head_dim_supported(D), op, ": head dim ", D,
                      " (the last dimension of 'q', 'k' and 'v') is not supported by the CUDA kernels "
                      "(supported: ", kCudaHeadDims, ")");
#endif
  } else {
    TORCH_CHECK_VALUE(D >= 1 && D <= kMaxHeadDimCpu, op, ": head dim must be in [1, ",
                      kMaxHeadDimCpu, "] on the CPU (CUDA: ", kCudaHeadDims, "), got ", D,
                      " (the last dimension of 'q', 'k' and 'v')");
  }
}

// The kernels scale by softmax_scale * log2(e) in the compute dtype (fp32 unless
// q is fp64): that product must be finite there.
double resolve_scale(const char* op, std::optional<double> scale, const at::Tensor& q) {
  const double s = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  const bool fp64 = q.scalar_type() == at::kDouble;
  const double limit =
      (fp64 ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max()) / kLog2e;
  TORCH_CHECK_VALUE(std::isfinite(s) && std::abs(s) <= limit, op, ": argument 'softmax_scale' must be finite",
                    fp64 ? "" : " with |softmax_scale| <= FLT_MAX / log2(e) (fp32)", ", got ", s);
  return s;
}

// Contiguous, and on CUDA 16-byte aligned (the kernels copy rows with 16-byte
// cp.async; a contiguous view at an odd storage offset would fault).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.is_cuda() && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// cu_seqlens_{q,k}: int32 [B + 1] on q's device; on the CPU also 0-based,
// non-decreasing, ending at the row count, with no sample longer than max_seqlen.
void check_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, const at::Tensor& q,
                      int64_t batch_plus_1, int64_t total, int64_t max_seqlen,
                      const char* max_name) {
  check_dtype(op, name, cu, {at::kInt});
  check_same_device(op, name, cu, "q", q);
  check_dim(op, name, cu, 1);
  TORCH_CHECK_VALUE(cu.size(0) >= 1, op, ": argument '", name,
                    "' must have B + 1 >= 1 entries, got shape ", cu.sizes());
  if (batch_plus_1 >= 0) {
    TORCH_CHECK_VALUE(cu.size(0) == batch_plus_1, op, ": arguments 'cu_seqlens_q' and "
                      "'cu_seqlens_k' must have the same length (B + 1), got ",
                      batch_plus_1, " and ", cu.size(0));
  }
  TORCH_CHECK_VALUE(max_seqlen >= 0, op, ": argument '", max_name,
                    "' must be non-negative, got ", max_seqlen);
  if (!cu.is_cpu()) return;  // no host sync on CUDA: the caller vouches for the contents
  const at::Tensor c = cu.contiguous();
  const int32_t* a = c.data_ptr<int32_t>();
  const int64_t n = c.size(0);
  TORCH_CHECK_VALUE(a[0] == 0, op, ": argument '", name, "' must start at 0, got ", a[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(a[i] >= a[i - 1], op, ": argument '", name,
                      "' must be non-decreasing, got ", a[i - 1], " then ", a[i], " at index ", i);
    TORCH_CHECK_VALUE(a[i] - a[i - 1] <= max_seqlen, op, ": sample ", i - 1, " has ",
                      a[i] - a[i - 1], " rows in '", name, "', more than '", max_name, "'=",
                      max_seqlen);
  }
  TORCH_CHECK_VALUE(a[n - 1] == total, op, ": argument '", name, "' must end at the row count ",
                    total, ", got ", a[n - 1]);
}

void check_mask(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& q,
                int64_t B, int64_t Lk) {
  if (!mask) return;
  check_dtype(op, "key_padding_mask", *mask, {at::kBool});
  check_same_device(op, "key_padding_mask", *mask, "q", q);
  check_shape(op, "key_padding_mask", *mask, {B, Lk});
}

// Backward-only tensors: dout and out like q, lse of the given shape.
void check_grad_inputs(const char* op, const at::Tensor& dout, const at::Tensor& out,
                       const at::Tensor& lse, const at::Tensor& q, at::IntArrayRef lse_shape) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"dout", &dout}, {"out", &out}}) {
    check_same_device(op, name, *t, "q", q);
    check_dtype(op, name, *t, {q.scalar_type()});
    check_shape(op, name, *t, q.sizes());
  }
  check_same_device(op, "lse", lse, "q", q);
  check_dtype(op, "lse", lse, {lse_dtype(q)});
  check_shape(op, "lse", lse, lse_shape);
}


#ifdef DSK_WITH_CUDA
// The CUDA kernels' grids put the query heads and the samples on y and z.
void check_cuda_grid(const char* op, const AttnParams& p) {
  constexpr int64_t kMaxGridYZ = 65535;
  TORCH_CHECK_VALUE(p.B <= kMaxGridYZ && p.Hq <= kMaxGridYZ, op, ": the CUDA kernels take at most ",
                    kMaxGridYZ, " samples and ", kMaxGridYZ, " query heads per call, got ", p.B,
                    " samples and ", p.Hq, " heads (split the batch)");
}
#endif

void run_fwd(const char* op, AttnParams p, const at::Tensor& ref) {
  if (ref.is_cuda()) {
#ifdef DSK_WITH_CUDA
    check_cuda_grid(op, p);
    p.fwd_kernel = fwd_kernel_choice().get();
    p.built_sm90a = built_for_cuda_arch("sm_90a");
    C10_CUDA_CHECK(static_cast<cudaError_t>(attention_fwd_cuda(p, stream_of(ref))));
#endif
  } else {
    attention_fwd_cpu(p);
  }
}

void run_bwd(const char* op, AttnParams p, const at::Tensor& ref) {
  if (ref.is_cuda()) {
#ifdef DSK_WITH_CUDA
    check_cuda_grid(op, p);
    p.built_sm90a = built_for_cuda_arch("sm_90a");
    const int64_t lse_numel = p.cu_seqlens_q ? p.Hq * p.total_q : p.B * p.Hq * p.seqlen_q;
    // Varlen: zeroed, since the delta kernel stops at max_seqlen_q (not checked
    // against the samples on CUDA: a host sync) while the dK/dV kernels read every
    // row of a sample: an understated max then gives wrong but finite gradients.
    const at::Tensor delta = p.cu_seqlens_q ? at::zeros({lse_numel}, ref.options().dtype(at::kFloat))
                                            : at::empty({lse_numel}, ref.options().dtype(at::kFloat));
    p.delta = delta.data_ptr<float>();
    // The generation that runs, and its workspace, zeroed (see AttnParams).
    at::Tensor dq_accum, semaphores;
    const int64_t q_rows = p.cu_seqlens_q ? p.total_q : p.B * p.seqlen_q;
    const int chosen = bwd_kernel_choice().get();
    static const bool dq_bulk = env_equals("DSK_ATTENTION_BWD_DQ_BULK", "1");
    p.dq_bulk = dq_bulk;  // v3's (its splits check the instance it picks)
    const bool try_v3 = chosen == 3 || chosen == kAttentionBwdAuto;
    int64_t v3_splits = try_v3 ? attention_bwd_v3_splits(p) : 0;
    if (v3_splits == 0 && p.dq_bulk && try_v3) {
      p.dq_bulk = false;  // the bulk instance cannot run here: v3 with atomics, if it can
      v3_splits = attention_bwd_v3_splits(p);
    }
    if (v3_splits > 0) {
      p.bwd_kernel = 3;
      p.dq_splits = v3_splits;
      dq_accum = at::zeros({v3_splits * q_rows * p.Hq * p.D}, ref.options().dtype(at::kFloat));
      p.dq_accum = dq_accum.data_ptr<float>();
    } else if ((chosen == 2 || chosen == 3) && attention_bwd_v2_supported(p)) {
      p.bwd_kernel = 2;
      dq_accum = at::zeros({q_rows * p.Hq * p.D}, ref.options().dtype(at::kFloat));
      semaphores = at::zeros({attention_bwd_v2_semaphores(p)}, ref.options().dtype(at::kInt));
      p.dq_accum = dq_accum.data_ptr<float>();
      p.dq_semaphores = semaphores.data_ptr<int32_t>();
      static const bool unordered = env_equals("DSK_ATTENTION_BWD_UNORDERED", "1");
      p.dq_in_turns = !unordered;
    }
    C10_CUDA_CHECK(static_cast<cudaError_t>(attention_bwd_cuda(p, stream_of(ref))));
#endif
  } else {
    attention_bwd_cpu(p);
  }
}

AttnParams base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       double scale, bool causal) {
  AttnParams p;
  p.dtype = to_dsk_dtype(q.scalar_type());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.Hq = q.size(-2);
  p.Hkv = k.size(-2);
  p.D = q.size(-1);
  p.softmax_scale = scale;
  p.causal = causal;
  return p;
}

// Private op for the benchmark's A/B and the tests: version 1, 2 or 3 selects the
// CUDA forward kernel for later calls, 4 auto (the default), 0 only asks.
// Returns the previous choice.
int64_t attention_cuda_kernel_op(int64_t version) {
  return fwd_kernel_choice().switch_to("_attention_cuda_kernel", version);
}

// The same for the CUDA backward kernel (1, 2 or 3; 4 auto, the default).
int64_t attention_cuda_bwd_kernel_op(int64_t version) {
  return bwd_kernel_choice().switch_to("_attention_cuda_bwd_kernel", version);
}

// The dense path's sizes.
struct DenseDims {
  int64_t B, Lq, Hq, Lk;
};

// Shared by the dense forward and backward: the argument checks.
DenseDims check_dense(const char* op, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask) {
  check_qkv(op, q, k, v, 4);
  const DenseDims d{q.size(0), q.size(1), q.size(2), k.size(1)};
  TORCH_CHECK_VALUE(k.size(0) == d.B, op,
                    ": arguments 'q' and 'k' must have the same batch size, got ", d.B, " and ",
                    k.size(0));
  check_mask(op, key_padding_mask, q, d.B, d.Lk);
  return d;
}

// Shared by the dense forward and backward: the length fields (mc: the contiguous
// key_padding_mask, or undefined).
AttnParams dense_params(const DenseDims& d, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& mc, double scale, bool causal) {
  AttnParams p = base_params(q, k, v, scale, causal);
  p.B = d.B;
  p.seqlen_q = d.Lq;
  p.seqlen_k = d.Lk;
  p.total_q = d.B * d.Lq;
  p.total_k = d.B * d.Lk;
  p.key_padding_mask = mc.defined() ? mc.data_ptr<bool>() : nullptr;
  return p;
}

// Shared by the varlen forward and backward: checks and the length fields.
AttnParams varlen_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                         int64_t max_q, int64_t max_k, std::optional<double> softmax_scale,
                         bool causal) {
  check_qkv(op, q, k, v, 3);
  check_cu_seqlens(op, "cu_seqlens_q", cu_q, q, -1, q.size(0), max_q, "max_seqlen_q");
  check_cu_seqlens(op, "cu_seqlens_k", cu_k, q, cu_q.size(0), k.size(0), max_k, "max_seqlen_k");
  AttnParams p = base_params(q, k, v, resolve_scale(op, softmax_scale, q), causal);
  p.B = cu_q.size(0) - 1;
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  // No sample is longer than its tensor: an overstated max (allowed, it only bounds
  // the samples) is clamped to the row count. The CUDA launchers size their grids
  // as ceil(max / tile) in 32 bits: with v1's 64-row tiles max_seqlen_q = 2^38 + 128
  // gave 2 query tiles (every sample's rows past 128 silently left 0), 2^62 no
  // valid grid at all.
  p.seqlen_q = std::min(max_q, p.total_q);
  p.seqlen_k = std::min(max_k, p.total_k);
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  return p;
}

// Shared by the dense and varlen backward: the backward's other tensors.
void set_grad_pointers(AttnParams& p, const at::Tensor& out, const at::Tensor& lse,
                       const at::Tensor& dout, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  p.out = const_cast<void*>(out.data_ptr());
  p.lse = const_cast<void*>(lse.data_ptr());
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    std::optional<double> softmax_scale, const std::optional<at::Tensor>& key_padding_mask,
    bool causal) {
  const char* op = "cross_attention";
  const DenseDims d = check_dense(op, q, k, v, key_padding_mask);
  const double scale = resolve_scale(op, softmax_scale, q);
  const c10::DeviceGuard guard(q.device());
  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v);
  const at::Tensor mc = key_padding_mask ? key_padding_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({d.B, d.Hq, d.Lq}, qc.options().dtype(lse_dtype(qc)));
  if (out.numel() == 0) return {out, lse};
  AttnParams p = dense_params(d, qc, kc, vc, mc, scale, causal);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  run_fwd(op, p, qc);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> softmax_scale,
    const std::optional<at::Tensor>& key_padding_mask, bool causal) {
  const char* op = "cross_attention_backward";
  const DenseDims d = check_dense(op, q, k, v, key_padding_mask);
  check_grad_inputs(op, dout, out, lse, q, {d.B, d.Hq, d.Lq});
  const double scale = resolve_scale(op, softmax_scale, q);
  const c10::DeviceGuard guard(q.device());
  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v);
  const at::Tensor oc = dense(out), gc = dense(dout), lc = lse.contiguous();
  const at::Tensor mc = key_padding_mask ? key_padding_mask->contiguous() : at::Tensor();
  at::Tensor dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  if (dq.numel() == 0 || dk.numel() == 0) {  // nothing to attend to, or no query asks
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AttnParams p = dense_params(d, qc, kc, vc, mc, scale, causal);
  set_grad_pointers(p, oc, lc, gc, dq, dk, dv);
  run_bwd(op, p, qc);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> cross_attention_varlen(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, std::optional<double> softmax_scale, bool causal) {
  const char* op = "cross_attention_varlen";
  check_defined(op, "q", q);  // read by the guard before the checks
  const c10::DeviceGuard guard(q.device());
  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v);
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  AttnParams p = varlen_params(op, qc, kc, vc, cq, ck, max_seqlen_q, max_seqlen_k, softmax_scale,
                               causal);
  // On CUDA the cu_seqlens contents are not checked: rows outside every sample
  // (or past max_seqlen_q) are written by no kernel, so start from zeros there.
  at::Tensor out = qc.is_cuda() ? at::zeros_like(qc) : at::empty_like(qc);
  at::Tensor lse = qc.is_cuda() ? at::full({p.Hq, p.total_q}, -INFINITY, qc.options().dtype(lse_dtype(qc)))
                                : at::empty({p.Hq, p.total_q}, qc.options().dtype(lse_dtype(qc)));
  if (out.numel() == 0 || p.B == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  run_fwd(op, p, qc);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_varlen_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    std::optional<double> softmax_scale, bool causal) {
  const char* op = "cross_attention_varlen_backward";
  check_defined(op, "q", q);  // read by the guard before the checks
  const c10::DeviceGuard guard(q.device());
  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v);
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  AttnParams p = varlen_params(op, qc, kc, vc, cq, ck, max_seqlen_q, max_seqlen_k, softmax_scale,
                               causal);
  check_grad_inputs(op, dout, out, lse, q, {p.Hq, p.total_q});
  const at::Tensor oc = dense(out), gc = dense(dout), lc = lse.contiguous();
  at::Tensor dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  // Also when there is work: rows outside every sample (cu_seqlens not covering
  // the tensors is only caught on the CPU) are written by no kernel: their gradient is 0.
  dq.zero_();
  dk.zero_();
  dv.zero_();
  if (dq.numel() == 0 || dk.numel() == 0 || p.B == 0) return {dq, dk, dv};
  set_grad_pointers(p, oc, lc, gc, dq, dk, dv);
  run_bwd(op, p, qc);
  return {dq, dk, dv};
}

}  // namespace dsk::attention

// A fragment here rather than in csrc/torch_bindings.cpp: a private knob of this
// family only, with no tensor arguments (a catch-all kernel serves every device).
TORCH_LIBRARY_FRAGMENT(deepseek_kernels, m) {
  m.def("_attention_cuda_kernel(int version=0) -> int",
        &dsk::attention::attention_cuda_kernel_op);
  m.def("_attention_cuda_bwd_kernel(int version=0) -> int",
        &dsk::attention::attention_cuda_bwd_kernel_op);
}
