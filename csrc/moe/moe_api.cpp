// Host glue for MoE routing: validate arguments, allocate outputs, fill the
// params structs and call the CPU or CUDA launchers.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_host.h"
#include "common/kernel_choice.h"
#include "moe/moe_api.h"
#include "moe/moe_params.h"

namespace dsk::moe {
namespace {

// DSK_MOE_KERNEL: v1 or v2 (the default: the same bits; on an H100 at T=8192,
// E=256, k=8 its kernels take 33 us against v1's 47) for the CUDA gating
// kernels, read on first use.
KernelChoice& gating_kernel_choice() {
  static KernelChoice choice("DSK_MOE_KERNEL", 2, 2);
  return choice;
}

// Private op for tests and the benchmark's A/B: version 1 or 2 selects the CUDA
// gating kernels for later calls, 0 only asks. Returns the previous choice.
int64_t moe_cuda_kernel_op(int64_t version) {
  return gating_kernel_choice().switch_to("_moe_cuda_kernel", version);
}

void check_data_dtype(const char* op, const char* name, const at::Tensor& t) {
  check_dtype(op, name, t, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK_TYPE(!(t.is_cuda() && t.scalar_type() == at::kDouble), op, ": argument '", name,
                   "' is float64, which only the CPU kernels support (for gradcheck)");
}

// ids/slots [T, k] int32, weights [T, k] fp32 (fp64 with fp64 data), all on data's device.
// The op's floating data tensor: device, dtype and rank.
void check_data(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  check_supported_device(op, name, t);
  check_data_dtype(op, name, t);
  check_dim(op, name, t, dim);
}

void check_choices(const char* op, const at::Tensor& data, const char* data_name, int64_t T,
                   const at::Tensor& ids, const at::Tensor& slots,
                   const std::optional<at::Tensor>& weights) {
  check_dtype(op, "expert_ids", ids, {at::kInt});
  check_dtype(op, "slots", slots, {at::kInt});
  check_same_device(op, "expert_ids", ids, data_name, data);
  check_same_device(op, "slots", slots, data_name, data);
  check_dim(op, "expert_ids", ids, 2);
  TORCH_CHECK_VALUE(ids.size(0) == T, op, ": argument 'expert_ids' must have ", T,
                    " rows (one per token), got shape ", ids.sizes());
  check_shape(op, "slots", slots, ids.sizes());
  TORCH_CHECK_VALUE(ids.size(1) <= kMaxK, op, ": argument 'expert_ids' must have at most ", kMaxK,
                    " choices per token (columns), got shape ", ids.sizes());
  if (weights) {
    check_dtype(op, "weights", *weights,
                {data.scalar_type() == at::kDouble ? at::kDouble : at::kFloat});
    check_same_device(op, "weights", *weights, data_name, data);
    check_shape(op, "weights", *weights, ids.sizes());
  }
}

void raise_bad_choice(const char* op, int64_t bad, int64_t k) {
  TORCH_CHECK_VALUE(bad < 0, op, ": arguments 'expert_ids'/'slots' hold an out-of-range choice at [",
                    bad / k, ", ", bad % k, "] (expert id >= num_experts, or slot >= its expert's ",
                    "capacity/count, or either below -1, the only negative value, meaning dropped)");
}

void* opt_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }


int64_t run_scatter(RowsParams p, const at::Tensor& ref) {
  if (ref.is_cuda()) {
#ifdef DSK_WITH_CUDA
    const at::Tensor row_map = at::full({p.dst_rows}, -1, ref.options().dtype(at::kLong));
    p.row_map = row_map.data_ptr<int64_t>();
    C10_CUDA_CHECK(static_cast<cudaError_t>(scatter_rows_cuda(p, stream_of(ref))));
#endif
    return -1;
  }
  return scatter_rows_cpu(p);
}

int64_t run_gather(const RowsParams& p, const at::Tensor& ref) {
  if (ref.is_cuda()) {
#ifdef DSK_WITH_CUDA
    C10_CUDA_CHECK(static_cast<cudaError_t>(gather_rows_cuda(p, stream_of(ref))));
#endif
    return -1;
  }
  return gather_rows_cpu(p);
}

RowsParams rows_params(const at::Tensor& ids, const at::Tensor& slots, const at::Tensor& w,
                       const at::Tensor& row_base, int64_t E, int64_t H) {
  RowsParams p;
  p.expert_ids = ids.data_ptr<int32_t>();
  p.slots = slots.data_ptr<int32_t>();
  p.weights = opt_ptr(w);
  p.row_base = row_base.defined() ? row_base.data_ptr<int64_t>() : nullptr;  // null: e * capacity
  p.T = ids.size(0);
  p.k = ids.size(1);
  p.E = E;
  p.H = H;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_topk_gating(const at::Tensor& logits, int64_t k,
                const std::optional<at::Tensor>& correction_bias, c10::string_view scoring,
                int64_t n_group,
                int64_t topk_group, bool renormalize, double routed_scaling_factor,
                std::optional<int64_t> capacity, c10::string_view drop_policy) {
  const char* op = "moe_topk_gating";
  check_data(op, "logits", logits, 2);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1 && E <= kMaxExperts, op, ": argument 'logits' must have 1 to ",
                    kMaxExperts, " experts (columns), got ", E);
  // Every token may choose the same expert: its count (expert_counts, routed_counts,
  // int32) and its choices' ranks and slots (int32) reach T, and the kernels' int32
  // counts and ranks would wrap at T = 2^31.
  TORCH_CHECK_VALUE(T <= std::numeric_limits<int32_t>::max(), op,
                    ": argument 'logits' must have at most 2^31 - 1 rows (tokens; counts and slots "
                    "are int32), got ", T);
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min<int64_t>(E, kMaxK), op, ": argument 'k' must be in [1, ",
                    std::min<int64_t>(E, kMaxK), "] (at most E=", E, " and ", kMaxK, "), got ", k);
  TORCH_CHECK_VALUE(scoring == "softmax" || scoring == "sigmoid", op,
                    ": argument 'scoring' must be 'softmax' or 'sigmoid', got '", scoring, "'");
  TORCH_CHECK_VALUE(drop_policy == "position" || drop_policy == "probability", op,
                    ": argument 'drop_policy' must be 'position' or 'probability', got '",
                    drop_policy, "'");
  TORCH_CHECK_VALUE(n_group >= 1 && E % n_group == 0, op,
                    ": argument 'n_group' must be a positive divisor of E=", E, ", got ", n_group);
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, op,
                    ": argument 'topk_group' must be in [1, n_group=", n_group, "], got ",
                    topk_group);
  TORCH_CHECK_VALUE(k <= topk_group * (E / n_group), op, ": argument 'k'=", k, " exceeds the ",
                    topk_group * (E / n_group), " experts of the kept groups (topk_group=",
                    topk_group, " of n_group=", n_group, ")");
  TORCH_CHECK_VALUE(!capacity || *capacity >= 0, op,
                    ": argument 'capacity' must be non-negative or None, got ", *capacity);
  const bool fp64 = logits.scalar_type() == at::kDouble;
  TORCH_CHECK_VALUE(std::isfinite(routed_scaling_factor) &&
                        (fp64 || std::abs(routed_scaling_factor) <= std::numeric_limits<float>::max()),
                    op, ": argument 'routed_scaling_factor' must be finite", fp64 ? "" : " in fp32", ", got ",
                    routed_scaling_factor);

  const c10::DeviceGuard guard(logits.device());
  const at::Tensor lc = logits.contiguous();
  const at::ScalarType cdt = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor bias;
  if (correction_bias) {
    check_same_device(op, "correction_bias", *correction_bias, "logits", logits);
    check_dtype(op, "correction_bias", *correction_bias,
                {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    check_shape(op, "correction_bias", *correction_bias, {E});
    bias = correction_bias->to(cdt).contiguous();
  }
  const auto opts = lc.options();
  at::Tensor weights = at::empty({T, k}, opts.dtype(cdt));
  at::Tensor ids = at::empty({T, k}, opts.dtype(at::kInt));
  at::Tensor slots = at::empty({T, k}, opts.dtype(at::kInt));
  at::Tensor expert_counts = at::empty({E}, opts.dtype(at::kInt));
  at::Tensor routed_counts = at::empty({E}, opts.dtype(at::kInt));
  at::Tensor mean_scores = at::empty({E}, opts.dtype(cdt));

  GatingParams p;
  p.logits = lc.data_ptr();
  p.logits_dtype = to_dsk_dtype(lc.scalar_type());
  p.bias = opt_ptr(bias);
  p.T = T;
  p.E = E;
  p.k = k;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.softmax = scoring == "softmax";
  p.renormalize = renormalize;
  p.routed_scaling_factor = routed_scaling_factor;
  p.capacity = capacity ? *capacity : -1;
  p.drop_probability = drop_policy == "probability";
  p.weights = weights.data_ptr();
  p.expert_ids = ids.data_ptr<int32_t>();
  p.slots = slots.data_ptr<int32_t>();
  p.expert_counts = expert_counts.data_ptr<int32_t>();
  p.routed_counts = routed_counts.data_ptr<int32_t>();
  p.mean_scores = mean_scores.data_ptr();

  if (lc.is_cuda()) {
#ifdef DSK_WITH_CUDA
    at::Tensor ws = at::empty({gating_workspace_bytes(T, E, k)}, opts.dtype(at::kByte));
    p.workspace = ws.data_ptr();
    p.cuda_kernel = gating_kernel_choice().get();
    static const bool dependent_launch = env_equals("DSK_MOE_PDL", "1");  // GatingParams::dependent_launch
    p.dependent_launch = dependent_launch;
    C10_CUDA_CHECK(static_cast<cudaError_t>(gating_cuda(p, stream_of(lc))));
#endif
  } else {
    gating_cpu(p);
  }
  return {weights, ids, slots, expert_counts, routed_counts, mean_scores};
}

at::Tensor moe_dispatch(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& slots,
                        int64_t num_experts, int64_t capacity,
                        const std::optional<at::Tensor>& weights) {
  const char* op = "moe_dispatch";
  check_data(op, "x", x, 2);
  check_choices(op, x, "x", x.size(0), expert_ids, slots, weights);
  check_positive(op, "num_experts", num_experts);
  TORCH_CHECK_VALUE(capacity >= 0, op, ": argument 'capacity' must be non-negative, got ",
                    capacity);
  // Expert ids and slots are int32: larger values address nothing, and would only
  // size (or overflow) the output's allocation.
  constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(num_experts <= kMaxInt32, op, ": argument 'num_experts' must be at most ",
                    kMaxInt32, " (expert ids are int32), got ", num_experts);
  TORCH_CHECK_VALUE(capacity <= kMaxInt32, op, ": argument 'capacity' must be at most ", kMaxInt32,
                    " (slots are int32), got ", capacity);
  const c10::DeviceGuard guard(x.device());
  const int64_t H = x.size(1);
  const at::Tensor xc = x.contiguous(), ic = expert_ids.contiguous(), sc = slots.contiguous();
  const at::Tensor wc = weights ? weights->contiguous() : at::Tensor();
  // The kernels write every row, zeros included.
  at::Tensor out = at::empty({num_experts, capacity, H}, xc.options());
  // Expert e's rows start at e * capacity (no row_base tensor: no extra launches).
  RowsParams p = rows_params(ic, sc, wc, at::Tensor(), num_experts, H);
  p.src = xc.data_ptr();
  p.dst = out.data_ptr();
  p.dtype = to_dsk_dtype(xc.scalar_type());
  p.capacity = capacity;
  p.dst_rows = num_experts * capacity;
  if (H > 0) raise_bad_choice(op, run_scatter(p, xc), p.k);
  return out;
}

at::Tensor moe_combine(const at::Tensor& expert_out, const at::Tensor& expert_ids,
                       const at::Tensor& slots, const std::optional<at::Tensor>& weights) {
  const char* op = "moe_combine";
  check_data(op, "expert_out", expert_out, 3);
  check_dim(op, "expert_ids", expert_ids, 2);
  check_choices(op, expert_out, "expert_out", expert_ids.size(0), expert_ids, slots, weights);
  const c10::DeviceGuard guard(expert_out.device());
  const int64_t E = expert_out.size(0), C = expert_out.size(1), H = expert_out.size(2);
  const at::Tensor eo = expert_out.contiguous(), ic = expert_ids.contiguous(),
                   sc = slots.contiguous();
  const at::Tensor wc = weights ? weights->contiguous() : at::Tensor();
  at::Tensor out = at::empty({ic.size(0), H}, eo.options());
  RowsParams p = rows_params(ic, sc, wc, at::Tensor(), E, H);  // rows of expert e at e * C
  p.src = eo.data_ptr();
  p.src_rows = E * C;
  p.dst = out.data_ptr();
  p.dtype = to_dsk_dtype(eo.scalar_type());
  p.capacity = C;
  if (out.numel() == 0) return out;
  raise_bad_choice(op, run_gather(p, eo), p.k);
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_permute(const at::Tensor& x, const at::Tensor& expert_ids,
                                               const at::Tensor& slots,
                                               const at::Tensor& expert_counts,
                                               const std::optional<at::Tensor>& weights,
                                               std::optional<int64_t> num_rows) {
  const char* op = "moe_permute";
  if (num_rows) {
    TORCH_CHECK_VALUE(*num_rows >= 0, op, ": argument 'num_rows' must be non-negative, got ", *num_rows);
    TORCH_CHECK_VALUE(*num_rows <= std::numeric_limits<int32_t>::max(), op,
                      ": argument 'num_rows' must be at most 2^31 - 1 (packed rows are addressed by int32 "
                      "offsets), got ", *num_rows);
  }
  check_data(op, "x", x, 2);
  check_choices(op, x, "x", x.size(0), expert_ids, slots, weights);
  check_dtype(op, "expert_counts", expert_counts, {at::kInt});
  check_same_device(op, "expert_counts", expert_counts, "x", x);
  check_dim(op, "expert_counts", expert_counts, 1);
  const c10::DeviceGuard guard(x.device());
  const int64_t E = expert_counts.size(0), H = x.size(1);
  const at::Tensor xc = x.contiguous(), ic = expert_ids.contiguous(), sc = slots.contiguous();
  const at::Tensor counts = expert_counts.contiguous();
  if (counts.is_cpu()) {
    const int32_t* c = counts.data_ptr<int32_t>();
    for (int64_t e = 0; e < E; ++e)
      TORCH_CHECK_VALUE(c[e] >= 0, op, ": argument 'expert_counts' must be non-negative, got ",
                        c[e], " at [", e, "]");
  }
  at::Tensor offsets64 = at::zeros({E + 1}, xc.options().dtype(at::kLong));
  offsets64.slice(0, 1).copy_(at::cumsum(counts, 0, at::kLong));
  // The packed size is data-dependent: one device-to-host read on CUDA, unless
  // num_rows fixes it (rows past offsets[E] are zero; on CUDA a choice past
  // num_rows is skipped, like every out-of-range choice there).
  int64_t total = num_rows ? *num_rows : -1;
  if (!num_rows || counts.is_cpu()) {
    const int64_t routed = offsets64[E].item<int64_t>();
    TORCH_CHECK_VALUE(routed >= 0 && routed <= std::numeric_limits<int32_t>::max(), op,
                      ": argument 'expert_counts' must sum to a row count in [0, 2^31), got ", routed);
    TORCH_CHECK_VALUE(!num_rows || routed <= *num_rows, op, ": argument 'num_rows'=", total,
                      " is smaller than sum(expert_counts)=", routed);
    if (!num_rows) total = routed;
  }
  at::Tensor packed = at::empty({total, H}, xc.options());
  const at::Tensor base = offsets64.slice(0, 0, E).contiguous();
  const at::Tensor wc = weights ? weights->contiguous() : at::Tensor();
  RowsParams p = rows_params(ic, sc, wc, base, E, H);
  p.src = xc.data_ptr();
  p.dst = packed.data_ptr();
  p.dtype = to_dsk_dtype(xc.scalar_type());
  p.slot_limit = counts.data_ptr<int32_t>();
  p.dst_rows = total;
  if (H > 0) raise_bad_choice(op, run_scatter(p, xc), p.k);
  return {packed, offsets64.to(at::kInt)};
}

at::Tensor moe_unpermute(const at::Tensor& packed, const at::Tensor& expert_ids,
                         const at::Tensor& slots, const at::Tensor& offsets,
                         const std::optional<at::Tensor>& weights) {
  const char* op = "moe_unpermute";
  check_data(op, "packed", packed, 2);
  check_dim(op, "expert_ids", expert_ids, 2);
  check_choices(op, packed, "packed", expert_ids.size(0), expert_ids, slots, weights);
  check_dtype(op, "offsets", offsets, {at::kInt});
  check_same_device(op, "offsets", offsets, "packed", packed);
  check_dim(op, "offsets", offsets, 1);
  TORCH_CHECK_VALUE(offsets.size(0) >= 2, op,
                    ": argument 'offsets' must hold E + 1 >= 2 values, got shape ",
                    offsets.sizes());
  const c10::DeviceGuard guard(packed.device());
  const int64_t E = offsets.size(0) - 1, H = packed.size(1);
  const at::Tensor pc = packed.contiguous(), ic = expert_ids.contiguous(), sc = slots.contiguous();
  const at::Tensor wc = weights ? weights->contiguous() : at::Tensor();
  const at::Tensor off64 = offsets.to(at::kLong);
  const at::Tensor base = off64.slice(0, 0, E).contiguous();
  // Per-expert slot limit: offsets[e + 1] - offsets[e] (and rows past `packed` are caught
  // on the CPU through it when offsets are consistent with packed).
  const at::Tensor limit = (off64.slice(0, 1) - off64.slice(0, 0, E)).to(at::kInt).contiguous();
  if (pc.is_cpu()) check_offsets_cpu(op, offsets, pc.size(0), "packed", /*end_at_most=*/true);
  at::Tensor out = at::empty({ic.size(0), H}, pc.options());
  RowsParams p = rows_params(ic, sc, wc, base, E, H);
  p.src = pc.data_ptr();
  p.src_rows = pc.size(0);
  p.dst = out.data_ptr();
  p.dtype = to_dsk_dtype(pc.scalar_type());
  p.slot_limit = limit.data_ptr<int32_t>();
  if (out.numel() == 0) return out;
  raise_bad_choice(op, run_gather(p, pc), p.k);
  return out;
}

at::Tensor moe_rows_dot(const at::Tensor& rows, const at::Tensor& other,
                        const at::Tensor& expert_ids, const at::Tensor& slots,
                        const at::Tensor& row_base, const std::optional<at::Tensor>& slot_limit,
                        int64_t capacity) {
  const char* op = "moe_rows_dot";
  check_data(op, "rows", rows, 2);
  check_dim(op, "other", other, 2);
  check_dtype(op, "other", other, {rows.scalar_type()});
  check_same_device(op, "other", other, "rows", rows);
  TORCH_CHECK_VALUE(other.size(1) == rows.size(1), op, ": argument 'other' must have ",
                    rows.size(1), " columns like 'rows', got shape ", other.sizes());
  check_choices(op, rows, "rows", other.size(0), expert_ids, slots, std::nullopt);
  check_dtype(op, "row_base", row_base, {at::kLong});
  check_same_device(op, "row_base", row_base, "rows", rows);
  check_dim(op, "row_base", row_base, 1);
  if (slot_limit) {
    check_dtype(op, "slot_limit", *slot_limit, {at::kInt});
    check_same_device(op, "slot_limit", *slot_limit, "rows", rows);
    check_shape(op, "slot_limit", *slot_limit, row_base.sizes());
  }
  const c10::DeviceGuard guard(rows.device());
  const at::Tensor rc = rows.contiguous(), oc = other.contiguous(), ic = expert_ids.contiguous(),
                   sc = slots.contiguous(), bc = row_base.contiguous();
  const at::Tensor lc = slot_limit ? slot_limit->contiguous() : at::Tensor();
  if (rc.is_cpu()) {  // every expert's rows [row_base, row_base + limit) inside `rows`
    const int64_t* base = bc.data_ptr<int64_t>();
    for (int64_t e = 0; e < bc.size(0); ++e) {
      const int64_t limit = lc.defined() ? lc.data_ptr<int32_t>()[e] : capacity;
      TORCH_CHECK_VALUE(base[e] >= 0 && (limit <= 0 || base[e] <= rc.size(0) - limit), op,
                        ": arguments 'row_base'/'slot_limit' (capacity) must keep expert ", e,
                        "'s rows inside rows.size(0) = ", rc.size(0), ", got row_base ", base[e],
                        " and limit ", limit);
    }
  }
  const at::ScalarType cdt = rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({ic.size(0), ic.size(1)}, rc.options().dtype(cdt));
  RowsParams p = rows_params(ic, sc, at::Tensor(), bc, bc.size(0), rc.size(1));
  p.src = rc.data_ptr();
  p.src_rows = rc.size(0);
  p.other = oc.data_ptr();
  p.dst = out.data_ptr();
  p.dtype = to_dsk_dtype(rc.scalar_type());
  p.slot_limit = lc.defined() ? lc.data_ptr<int32_t>() : nullptr;
  p.capacity = capacity;
  if (out.numel() == 0) return out;
  if (rc.is_cuda()) {
#ifdef DSK_WITH_CUDA
    C10_CUDA_CHECK(static_cast<cudaError_t>(rows_dot_cuda(p, stream_of(rc))));
#endif
  } else {
    raise_bad_choice(op, rows_dot_cpu(p), p.k);
  }
  return out;
}

}  // namespace dsk::moe

// A fragment here rather than in csrc/torch_bindings.cpp: a private knob of this
// family only, with no tensor arguments (a catch-all kernel serves every device).
TORCH_LIBRARY_FRAGMENT(deepseek_kernels, m) {
  m.def("_moe_cuda_kernel(int version=0) -> int", &dsk::moe::moe_cuda_kernel_op);
}
