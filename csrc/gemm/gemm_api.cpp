// Host glue for the GEMM family: validate arguments, allocate outputs, fill
// the params structs and call the CPU or CUDA launchers. On the CPU the
// floating-point products run in ATen's BLAS (fp32, or fp64 for fp64 inputs)
// and our epilogue applies bias, activation and the output cast.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/Utils.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/build_info.h"
#include "common/checks.h"
#include "common/cuda_host.h"
#include "common/kernel_choice.h"
#include "gemm/gemm_api.h"
#include "gemm/gemm_params.h"

namespace dsk::gemm {
namespace {

// DSK_GEMM_KERNEL: auto (the default), v1, v2 or v3, read on first use.
KernelChoice& gemm_kernel_choice() {
  static KernelChoice choice("DSK_GEMM_KERNEL", kGemmKernelAuto, 3, kGemmKernelAuto);
  return choice;
}

// DSK_WS_WARP_ARRIVALS=1 (both families' warp-specialized kernels), read once.
bool ws_warp_arrivals() {
  static const bool on = env_equals("DSK_WS_WARP_ARRIVALS", "1");
  return on;
}

#ifdef DSK_WITH_CUDA
// The CUDA bf16/fp16 kernel choice every GemmParams gets (plain and grouped).
// DSK_GEMM_TMA=0 makes v3 copy its tiles with cp.async instead of TMA (A/B runs,
// debugging); DSK_GEMM_SKIP_EMPTY_ROWS=1, DSK_GEMM_CLUSTER=1,
// DSK_GEMM_DEEP_PREFETCH=1, DSK_GEMM_WARP_SPECIALIZED=1 and DSK_WS_WARP_ARRIVALS=1
// turn on v3's opt-in variants (GemmParams); read once.
void set_cuda_kernel(GemmParams& p) {
  static const bool tma = !env_equals("DSK_GEMM_TMA", "0");
  static const bool skip_empty_rows = env_equals("DSK_GEMM_SKIP_EMPTY_ROWS", "1");
  static const bool cluster = env_equals("DSK_GEMM_CLUSTER", "1");
  static const bool deep_prefetch = env_equals("DSK_GEMM_DEEP_PREFETCH", "1");
  static const bool warp_specialized = env_equals("DSK_GEMM_WARP_SPECIALIZED", "1");
  p.cuda_kernel = gemm_kernel_choice().get();
  p.built_sm90a = built_for_cuda_arch("sm_90a");
  p.v3_tma = tma;
  p.v3_skip_empty_rows = skip_empty_rows;
  p.v3_cluster = cluster;
  p.v3_deep_prefetch = deep_prefetch;
  p.v3_warp_specialized = warp_specialized;
  p.v3_ws_warp_arrivals = ws_warp_arrivals();
}
#endif

// Private op for tests and the benchmark's A/B: version 1, 2 or 3 forces that CUDA
// bf16/fp16 GEMM kernel for later calls, 4 is auto (the default), 0 only asks.
// Returns the previous choice.
int64_t gemm_cuda_kernel_op(int64_t version) {
  return gemm_kernel_choice().switch_to("_gemm_cuda_kernel", version);
}

// DSK_FP8_KERNEL: v1 (exact SIMT: bitwise the CPU), v2 (mma.sync tensor cores,
// sm_89+) or v3 (wgmma, sm_90a; the default: where it cannot run v2 does, then v1).
// On an H100 at 4096x7168x16384 (session 9): v1 96 ms, v2 5.3 ms, v3 1.1-1.2 ms
// (warp-specialized, fused promotion; the earlier cp.async v3 2.2 ms).
KernelChoice& fp8_kernel_choice() {
  static KernelChoice choice("DSK_FP8_KERNEL", 3, 3);
  return choice;
}

// Private ops: 1 to 3 (FP8) or 1 to 2 (INT8) selects the CUDA FP8 / INT8 GEMM
// kernel for later calls, 0 only asks. Return the previous choice.
int64_t fp8_cuda_kernel_op(int64_t version) {
  return fp8_kernel_choice().switch_to("_fp8_cuda_kernel", version);
}

// DSK_INT8_KERNEL: v1 (dp4a) or v2 (tensor cores, the default; the same bits, and
// on an H100 at 4096^3 0.33 ms against v1's 2.3).
KernelChoice& int8_kernel_choice() {
  static KernelChoice choice("DSK_INT8_KERNEL", 2, 2);
  return choice;
}

int64_t int8_cuda_kernel_op(int64_t version) {
  return int8_kernel_choice().switch_to("_int8_cuda_kernel", version);
}

// DSK_INT8_CPU_SUMS: who computes the CPU INT8 GEMM's int32 sums: 1 our loop,
// 2 torch's int8 matmul (at::_int_mm, oneDNN), auto (3, the default) torch's where
// the CPU has AVX512-VNNI (~16x our loop at 256^3 on such a CPU; elsewhere torch's
// was ~5x slower than ours). Integer sums are exact, so every choice gives the same bits.
KernelChoice& int8_cpu_sums_choice() {
  static KernelChoice choice("DSK_INT8_CPU_SUMS", 3, 2, 3);
  return choice;
}

int64_t int8_cpu_sums_op(int64_t version) {
  return int8_cpu_sums_choice().switch_to("_int8_cpu_sums", version);
}

bool int8_sums_by_torch() {
  const int choice = int8_cpu_sums_choice().get();
  if (choice != 3) return choice == 2;
  static const bool vnni = at::cpu::is_avx512_vnni_supported();
  return vnni;
}

// DSK_GEMM_CPU_BF16: the CPU's bf16 gemm / grouped_gemm products: 1 fp32 BLAS on
// converted copies, 2 our AVX512-BF16 kernel (bf16_matmul_cpu), auto (3, the
// default) 2 where the CPU has AVX512-BF16. Both accumulate in fp32 (not the
// same bits); 2 forced on a CPU without the instructions runs 1.
KernelChoice& gemm_cpu_bf16_choice() {
  static KernelChoice choice("DSK_GEMM_CPU_BF16", 3, 2, 3);
  return choice;
}

int64_t gemm_cpu_bf16_op(int64_t version) {
  return gemm_cpu_bf16_choice().switch_to("_gemm_cpu_bf16", version);
}

bool bf16_by_dot_products(const at::Tensor& a) {
  return a.scalar_type() == at::kBFloat16 && gemm_cpu_bf16_choice().get() != 1 &&
         bf16_dot_products_available();
}

// acc[M, N] (fp32, row stride N) = a[M, K] . w[N, K]^T, both contiguous bf16.
void bf16_matmul(const at::Tensor& a, const at::Tensor& w, at::Tensor& acc) {
  Bf16MatmulParams p;
  p.a = reinterpret_cast<const uint16_t*>(a.data_ptr());
  p.w = reinterpret_cast<const uint16_t*>(w.data_ptr());
  p.acc = acc.data_ptr<float>();
  p.m = a.size(0);
  p.n = w.size(0);
  p.k = a.size(1);
  bf16_matmul_cpu(p);
}

// |acc| <= 128 * 128 * K must fit in int32 (int8 operands may hold -128).
constexpr int64_t kMaxInt8K = ((int64_t{1} << 31) - 1) / (128 * 128);  // 131,071

Activation parse_activation(const char* op, const std::string& name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(false, op, ": argument 'activation' must be one of none, relu, gelu, ",
                    "gelu_tanh, silu, got '", name, "'");
}

void check_float_data(const char* op, const char* name, const at::Tensor& t) {
  check_supported_device(op, name, t);
  check_dtype(op, name, t, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK_TYPE(!(t.is_cuda() && t.scalar_type() == at::kDouble), op, ": argument '", name,
                   "' is float64, which only the CPU kernels support (for gradcheck)");
}

at::ScalarType check_out_dtype(const char* op, std::optional<at::ScalarType> out_dtype,
                               at::ScalarType input) {
  const at::ScalarType dtype = out_dtype.value_or(input);
  if (input == at::kDouble) {
    TORCH_CHECK_TYPE(dtype == at::kDouble, op,
                     ": argument 'out_dtype' must be Double for float64 inputs, got ", dtype);
  } else {
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                     ": argument 'out_dtype' must be one of Float, Half, BFloat16, got ", dtype);
  }
  return dtype;
}

// Contiguous with a 16-byte aligned start (the CUDA kernels load 16-byte chunks).
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

#ifdef DSK_WITH_CUDA
// The tensor-core kernels copy K in 16-byte chunks (8 bf16/fp16 values): pad K
// with zeros when it is not a multiple of 8 (rare; costs one copy of a and b).
at::Tensor pad_k_for_tensor_cores(const at::Tensor& t) {
  const int64_t k = t.size(-1);
  if (t.scalar_type() == at::kFloat || k % 8 == 0) return contiguous_aligned(t);
  return at::constant_pad_nd(t, {0, 8 - k % 8}, 0).contiguous();
}

#endif

at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// CPU: the activation in place on the fp32/fp64 accumulator, by ATen's vectorized
// elementwise kernels (a scalar erf per element cost 2-3x the GEMM itself).
void activation_cpu_(at::Tensor& acc, Activation act) {
  switch (act) {
    case Activation::kRelu: acc.relu_(); break;
    case Activation::kGelu: at::gelu_(acc, "none"); break;
    case Activation::kGeluTanh: at::gelu_(acc, "tanh"); break;
    case Activation::kSilu: at::silu_(acc); break;
    default: break;
  }
}

// CPU: out = act(acc + bias) in out's dtype: in place on the accumulator (it is
// ours), then one rounding to out's dtype.
void run_epilogue_cpu(at::Tensor& acc, const at::Tensor& bias, at::Tensor& out, Activation act) {
  if (bias.defined()) acc.add_(bias.to(acc.scalar_type()));
  activation_cpu_(acc, act);
  out.copy_(acc);
}

// The quantized GEMMs' shared checks: a [M, K] and w (`w_layout`, K last) hold
// `code` values, the scales are fp32, everything is on a's device.
void check_quantized_operands(const char* op, const at::Tensor& a, const at::Tensor& a_scales,
                              const at::Tensor& w, const at::Tensor& w_scales, at::ScalarType code,
                              const char* w_layout) {
  check_supported_device(op, "a", a);
  check_dtype(op, "a", a, {code});
  check_dtype(op, "w", w, {code});
  check_dtype(op, "a_scales", a_scales, {at::kFloat});
  check_dtype(op, "w_scales", w_scales, {at::kFloat});
  check_same_device(op, "a_scales", a_scales, "a", a);
  check_same_device(op, "w", w, "a", a);
  check_same_device(op, "w_scales", w_scales, "a", a);
  check_dim(op, "a", a, 2);
  const int64_t w_dim = w_layout[1] == 'E' ? 3 : 2;  // "[E, N, K]" or "[N, K]"
  check_dim(op, "w", w, w_dim);
  TORCH_CHECK_VALUE(w.size(-1) == a.size(1), op, ": argument 'w' must have shape ", w_layout,
                    " with K = ", a.size(1), " (a's last dimension), got ", w.sizes());
}

// fp8_gemm (offsets empty) and fp8_grouped_gemm (w [E, N, K], offsets [E + 1]).
at::Tensor run_fp8_gemm(const char* op, const at::Tensor& a, const at::Tensor& a_scales,
                        const at::Tensor& w, const at::Tensor& w_scales,
                        const std::optional<at::Tensor>& offsets,
                        std::optional<at::ScalarType> out_dtype) {
  const bool grouped = offsets.has_value();
  check_quantized_operands(op, a, a_scales, w, w_scales, at::kFloat8_e4m3fn, grouped ? "[E, N, K]" : "[N, K]");
  const int64_t m = a.size(0), k = a.size(1), n = w.size(-2), groups = grouped ? w.size(0) : 1;
  const int64_t k_blocks = ceil_div(k, kFp8Block);
  check_shape(op, "a_scales", a_scales, {m, k_blocks});  // (1, 128) blocks
  if (grouped) {
    check_shape(op, "w_scales", w_scales, {groups, ceil_div(n, kFp8Block), k_blocks});  // (128, 128) blocks
    check_same_device(op, "offsets", *offsets, "a", a);
    check_dtype(op, "offsets", *offsets, {at::kInt, at::kLong});
    check_shape(op, "offsets", *offsets, {groups + 1});
    // As grouped_gemm: checked on the CPU; CUDA offsets stay on the device, clamped by the kernel.
    if (a.is_cpu()) check_offsets_cpu(op, *offsets, m, "a");
  } else {
    check_shape(op, "w_scales", w_scales, {ceil_div(n, kFp8Block), k_blocks});  // (128, 128) blocks
  }
  const at::ScalarType dtype = check_out_dtype(op, out_dtype, at::kBFloat16);
  const c10::DeviceGuard guard(a.device());
  at::Tensor out = at::empty({m, n}, a.options().dtype(dtype));
  if (m == 0 || n == 0) return out;
  const at::Tensor ac = contiguous_aligned(a), wc = contiguous_aligned(w);
  const at::Tensor asc = a_scales.contiguous(), wsc = w_scales.contiguous();
  const at::Tensor oc = grouped ? offsets->contiguous() : at::Tensor();
  Fp8GemmParams p;
  p.a = static_cast<const uint8_t*>(ac.data_ptr());
  p.a_scales = asc.data_ptr<float>();
  p.w = static_cast<const uint8_t*>(wc.data_ptr());
  p.w_scales = wsc.data_ptr<float>();
  p.out = out.data_ptr();
  p.out_dtype = to_dsk_dtype(dtype);
  p.m = m;
  p.n = n;
  p.k = k;
  p.k_blocks = k_blocks;
  p.cuda_kernel = fp8_kernel_choice().get();
  p.built_sm90a = built_for_cuda_arch("sm_90a");
  // Fp8GemmParams::v3_tma, v3_deep_prefetch, v3_cluster, v3_warp_specialized and
  // v3_fma_promotion (the last four imply TMA). Warp specialization with the fused
  // promotion is the default (H100: 810 TFLOP/s at 4096x7168x16384, against 632
  // with the contract's promotion and 429 for v3 without warp specialization);
  // DSK_FP8_WARP_SPECIALIZED=0 gives the earlier v3 (then TMA, deep prefetch and
  // clusters are its opt-in variants), DSK_FP8_FMA_PROMOTION=0 the contract's
  // promotion; DSK_FP8_FMA_PROMOTION=1 implies warp specialization.
  static const bool fp8_tma = env_equals("DSK_FP8_TMA", "1");
  static const bool fp8_deep = env_equals("DSK_FP8_DEEP_PREFETCH", "1");
  static const bool fp8_cluster = env_equals("DSK_FP8_CLUSTER", "1");
  static const bool fp8_warp_specialized =
      !env_equals("DSK_FP8_WARP_SPECIALIZED", "0") || env_equals("DSK_FP8_FMA_PROMOTION", "1");
  static const bool fp8_fma_promotion = fp8_warp_specialized && !env_equals("DSK_FP8_FMA_PROMOTION", "0");
  p.v3_tma = fp8_tma || fp8_deep || fp8_cluster || fp8_warp_specialized;
  p.v3_deep_prefetch = fp8_deep;
  p.v3_cluster = fp8_cluster;
  p.v3_warp_specialized = fp8_warp_specialized;
  p.v3_fma_promotion = fp8_fma_promotion;
  p.v3_ws_warp_arrivals = ws_warp_arrivals();
  if (grouped) {
    p.offsets = oc.data_ptr();
    p.offsets_int64 = oc.scalar_type() == at::kLong;
    p.groups = groups;
  }
  if (a.is_cuda()) {
#ifdef DSK_WITH_CUDA
    C10_CUDA_CHECK(static_cast<cudaError_t>(fp8_gemm_cuda(p, stream_of(a))));
#endif
  } else {
    fp8_gemm_cpu(p);
  }
  return out;
}

}  // namespace

at::Tensor gemm(const at::Tensor& a, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::string& activation, std::optional<at::ScalarType> out_dtype) {
  const char* op = "gemm";
  // Called under torch.autocast, the ATen matmuls inside would run at the autocast
  // dtype, not the compute dtype chosen here (and the epilogue would misread them).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_float_data(op, "a", a);
  check_float_data(op, "weight", weight);
  check_same_device(op, "weight", weight, "a", a);
  TORCH_CHECK_TYPE(weight.scalar_type() == a.scalar_type(), op,
                   ": argument 'weight' must have the dtype of 'a' (", a.scalar_type(), "), got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(a.dim() >= 1, op, ": argument 'a' must be at least 1-D [..., K], got shape ",
                    a.sizes());
  check_dim(op, "weight", weight, 2);
  const int64_t k = a.size(-1), n = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == k, op, ": argument 'weight' must have shape [N, K] with K = ",
                    k, " (a's last dimension), got ", weight.sizes());
  if (bias) {
    check_same_device(op, "bias", *bias, "a", a);
    check_dtype(op, "bias", *bias, {a.scalar_type(), compute_dtype(a)});
    check_shape(op, "bias", *bias, {n});
  }
  const Activation act = parse_activation(op, activation);
  const at::ScalarType dtype = check_out_dtype(op, out_dtype, a.scalar_type());

  const c10::DeviceGuard guard(a.device());
  std::vector<int64_t> out_shape(a.sizes().begin(), a.sizes().end());
  out_shape.back() = n;
  const int64_t m = c10::multiply_integers(a.sizes().slice(0, a.dim() - 1));
  const at::Tensor a2 = a.reshape({m, k});  // explicit m: K = 0 leaves -1 ambiguous
  at::Tensor out = at::empty(out_shape, a.options().dtype(dtype));
  if (m == 0 || n == 0) return out;
  const at::Tensor bias_c = bias ? bias->to(compute_dtype(a)).contiguous() : at::Tensor();

  if (a.is_cuda()) {
#ifdef DSK_WITH_CUDA
    const at::Tensor ac = pad_k_for_tensor_cores(a2);
    const at::Tensor wc = pad_k_for_tensor_cores(weight);
    GemmParams p;
    p.a = ac.data_ptr();
    p.b = wc.data_ptr();
    p.bias = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
    p.out = out.data_ptr();
    p.ab_dtype = to_dsk_dtype(a.scalar_type());
    p.out_dtype = to_dsk_dtype(dtype);
    p.m = m;
    p.n = n;
    p.k = ac.size(1);
    p.activation = act;
    set_cuda_kernel(p);
    C10_CUDA_CHECK(static_cast<cudaError_t>(gemm_cuda(p, stream_of(a))));
#endif
    return out;
  }
  const at::ScalarType cdt = compute_dtype(a);
  at::Tensor out2 = out.view({m, n});
  if (bf16_by_dot_products(a)) {
    at::Tensor acc = at::empty({m, n}, a.options().dtype(at::kFloat));
    bf16_matmul(a2.contiguous(), weight.contiguous(), acc);
    run_epilogue_cpu(acc, bias_c, out2, act);
    return out;
  }
  // BLAS adds the bias (addmm, as F.linear); the activation follows in place. An
  // fp32/fp64 output is the accumulator itself: no temporary, no copy.
  const bool in_place = dtype == cdt;
  at::Tensor acc = in_place ? out2 : at::empty({m, n}, a.options().dtype(cdt));
  if (bias_c.defined())
    at::addmm_out(acc, bias_c, a2.to(cdt), weight.to(cdt).t());
  else
    at::mm_out(acc, a2.to(cdt), weight.to(cdt).t());
  activation_cpu_(acc, act);
  if (!in_place) out2.copy_(acc);
  return out;
}

at::Tensor grouped_gemm(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& offsets,
                        std::optional<at::ScalarType> out_dtype) {
  const char* op = "grouped_gemm";
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // see gemm
  check_float_data(op, "x", x);
  check_float_data(op, "weights", weights);
  check_same_device(op, "weights", weights, "x", x);
  check_same_device(op, "offsets", offsets, "x", x);
  TORCH_CHECK_TYPE(weights.scalar_type() == x.scalar_type(), op,
                   ": argument 'weights' must have the dtype of 'x' (", x.scalar_type(), "), got ",
                   weights.scalar_type());
  check_dtype(op, "offsets", offsets, {at::kInt, at::kLong});
  check_dim(op, "x", x, 2);
  check_dim(op, "weights", weights, 3);
  check_dim(op, "offsets", offsets, 1);
  const int64_t s = x.size(0), k = x.size(1), groups = weights.size(0), n = weights.size(1);
  TORCH_CHECK_VALUE(weights.size(2) == k, op,
                    ": argument 'weights' must have shape [E, N, K] with K = ", k,
                    " (x's last dimension), got ", weights.sizes());
  TORCH_CHECK_VALUE(offsets.size(0) == groups + 1, op,
                    ": argument 'offsets' must have E + 1 = ", groups + 1, " entries, got shape ",
                    offsets.sizes());
  const at::ScalarType dtype = check_out_dtype(op, out_dtype, x.scalar_type());
  // CUDA offsets stay on the device (no host sync): their values are checked
  // on the CPU only; the CUDA kernel clamps them, so bad values cannot reach
  // out-of-bounds memory (the result is then unspecified).
  if (x.is_cpu()) check_offsets_cpu(op, offsets, s);

  const c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({s, n}, x.options().dtype(dtype));
  if (s == 0 || n == 0) return out;

  if (x.is_cuda()) {
#ifdef DSK_WITH_CUDA
    const at::Tensor xc = pad_k_for_tensor_cores(x);
    const at::Tensor wc = pad_k_for_tensor_cores(weights);
    const at::Tensor oc = offsets.contiguous();
    GemmParams p;
    p.a = xc.data_ptr();
    p.b = wc.data_ptr();
    p.out = out.data_ptr();
    p.ab_dtype = to_dsk_dtype(x.scalar_type());
    p.out_dtype = to_dsk_dtype(dtype);
    p.m = s;
    p.n = n;
    p.k = xc.size(1);
    p.offsets = oc.data_ptr();
    p.offsets_int64 = oc.scalar_type() == at::kLong;
    p.groups = groups;
    set_cuda_kernel(p);  // auto keeps grouped GEMMs on v1; v2/v3 when forced
    C10_CUDA_CHECK(static_cast<cudaError_t>(gemm_cuda(p, stream_of(x))));
#endif
    return out;
  }
  const at::ScalarType cdt = compute_dtype(x);
  const at::Tensor bounds = offsets.to(at::kLong).contiguous();
  const int64_t* o = bounds.data_ptr<int64_t>();
  const bool dot_products = bf16_by_dot_products(x);
  const at::Tensor xf = dot_products ? x.contiguous() : x.to(cdt);
  const at::Tensor wb = dot_products ? weights.contiguous() : at::Tensor();
  // fp32/fp64 out: the products land in out directly (no epilogue pass).
  const bool direct = dtype == cdt;
  at::Tensor acc = direct ? out : at::empty({s, n}, x.options().dtype(cdt));
  // OpenMP workers do not inherit the caller's dispatcher state (e.g. "below
  // autograd"): carry it over, or mm_out would see inputs that require grad.
  const at::ThreadLocalState caller_state;
  auto run_groups = [&](int64_t g0, int64_t g1) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t g = g0; g < g1; ++g) {
      if (o[g + 1] == o[g]) continue;
      at::Tensor dst = acc.narrow(0, o[g], o[g + 1] - o[g]);
      if (dot_products)
        bf16_matmul(xf.narrow(0, o[g], o[g + 1] - o[g]), wb[g], dst);
      else
        at::mm_out(dst, xf.narrow(0, o[g], o[g + 1] - o[g]), weights[g].to(cdt).t());
    }
  };
  // Many groups: one parallel region over groups, each BLAS call on one thread
  // (a parallel BLAS call per small group pays a thread wake-up each). Few
  // groups: one after the other, each BLAS call parallel.
  if (groups >= 2 * at::get_num_threads()) {
    at::parallel_for(0, groups, 1, run_groups);
  } else {
    run_groups(0, groups);
  }
  if (!direct) out.copy_(acc);  // one rounding to the output dtype
  return out;
}

at::Tensor grouped_gemm_wgrad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets,
                              int64_t num_groups) {
  const char* op = "grouped_gemm_wgrad";
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // see gemm
  check_float_data(op, "dy", dy);
  check_float_data(op, "x", x);
  check_same_device(op, "dy", dy, "x", x);
  check_same_device(op, "offsets", offsets, "x", x);
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), op, ": argument 'dy' must have the dtype of 'x' (",
                   x.scalar_type(), "), got ", dy.scalar_type());
  check_dtype(op, "offsets", offsets, {at::kInt, at::kLong});
  check_dim(op, "dy", dy, 2);
  check_dim(op, "x", x, 2);
  TORCH_CHECK_VALUE(num_groups >= 0, op, ": argument 'num_groups' must be non-negative, got ", num_groups);
  TORCH_CHECK_VALUE(dy.size(0) == x.size(0), op, ": argument 'dy' must have x.size(0) = ", x.size(0),
                    " rows, got shape ", dy.sizes());
  check_shape(op, "offsets", offsets, {num_groups + 1});
  // The group bounds drive one BLAS call per group: read them on the host (one
  // sync on CUDA; backward only), where they are also validated.
  const at::Tensor bounds = offsets.to(at::kCPU).to(at::kLong).contiguous();
  check_offsets_cpu(op, bounds, x.size(0));
  const int64_t* o = bounds.data_ptr<int64_t>();
  const c10::DeviceGuard guard(x.device());
  at::Tensor dw = at::zeros({num_groups, dy.size(1), x.size(1)}, x.options());
  for (int64_t g = 0; g < num_groups; ++g) {
    if (o[g + 1] == o[g]) continue;
    at::Tensor dst = dw[g];
    at::mm_out(dst, dy.narrow(0, o[g], o[g + 1] - o[g]).t(), x.narrow(0, o[g], o[g + 1] - o[g]));
  }
  return dw;
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_rowwise(const at::Tensor& x) {
  const char* op = "quantize_int8_rowwise";
  check_supported_device(op, "x", x);
  check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  check_dim(op, "x", x, 2);
  const c10::DeviceGuard guard(x.device());
  const at::Tensor xc = contiguous_aligned(x);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  QuantizeRowsParams p;
  p.x = xc.data_ptr();
  p.x_dtype = to_dsk_dtype(x.scalar_type());
  p.q = q.data_ptr<int8_t>();
  p.scales = scales.data_ptr<float>();
  p.rows = x.size(0);
  p.cols = x.size(1);
  if (p.rows == 0) return {q, scales};
  if (x.is_cuda()) {
#ifdef DSK_WITH_CUDA
    C10_CUDA_CHECK(static_cast<cudaError_t>(quantize_rows_int8_cuda(p, stream_of(x))));
#endif
  } else {
    quantize_rows_int8_cpu(p);
  }
  return {q, scales};
}

at::Tensor int8_gemm(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& w,
                     const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                     std::optional<at::ScalarType> out_dtype) {
  const char* op = "int8_gemm";
  check_quantized_operands(op, a, a_scales, w, w_scales, at::kChar, "[N, K]");
  const int64_t m = a.size(0), k = a.size(1), n = w.size(0);
  TORCH_CHECK_VALUE(k <= kMaxInt8K, op, ": K = ", k, " exceeds ", kMaxInt8K,
                    " (the int32 accumulator could overflow)");
  check_shape(op, "a_scales", a_scales, {m});
  check_shape(op, "w_scales", w_scales, {n});
  if (bias) {
    check_dtype(op, "bias", *bias, {at::kFloat});
    check_same_device(op, "bias", *bias, "a", a);
    check_shape(op, "bias", *bias, {n});
  }
  const at::ScalarType dtype = check_out_dtype(op, out_dtype, at::kBFloat16);

  const c10::DeviceGuard guard(a.device());
  at::Tensor out = at::empty({m, n}, a.options().dtype(dtype));
  if (m == 0 || n == 0) return out;
  const at::Tensor ac = contiguous_aligned(a), wc = contiguous_aligned(w);
  const at::Tensor asc = a_scales.contiguous(), wsc = w_scales.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  Int8GemmParams p;
  p.a = ac.data_ptr<int8_t>();
  p.a_scales = asc.data_ptr<float>();
  p.w = wc.data_ptr<int8_t>();
  p.w_scales = wsc.data_ptr<float>();
  p.bias = bc.defined() ? bc.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.out_dtype = to_dsk_dtype(dtype);
  p.m = m;
  p.n = n;
  p.k = k;
  p.cuda_kernel = int8_kernel_choice().get();
  if (a.is_cuda()) {
#ifdef DSK_WITH_CUDA
    C10_CUDA_CHECK(static_cast<cudaError_t>(int8_gemm_cuda(p, stream_of(a))));
#endif
  } else {
    at::Tensor sums;
    if (k > 0 && int8_sums_by_torch()) {
      sums = at::_int_mm(ac, wc.t());  // [M, N] int32, exact
      p.acc = sums.data_ptr<int32_t>();
    }
    int8_gemm_cpu(p);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, at::IntArrayRef block) {
  const char* op = "quantize_fp8";
  check_supported_device(op, "x", x);
  check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, op,
                    ": argument 'x' must be 2-D [M, K] or 3-D [E, M, K], got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(block.size() == 2 && (block[0] == 1 || block[0] == kFp8Block) &&
                        block[1] == kFp8Block,
                    op, ": argument 'block' must be (1, 128) or (128, 128), got ", block);
  const c10::DeviceGuard guard(x.device());
  const at::Tensor xc = contiguous_aligned(x);
  QuantizeFp8Params p;
  p.batch = x.dim() == 3 ? x.size(0) : 1;
  p.rows = x.size(-2);
  p.cols = x.size(-1);
  p.block_rows = block[0];
  p.col_blocks = ceil_div(p.cols, kFp8Block);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  std::vector<int64_t> scale_shape{ceil_div(p.rows, p.block_rows), p.col_blocks};
  if (x.dim() == 3) scale_shape.insert(scale_shape.begin(), p.batch);
  at::Tensor scales = at::empty(scale_shape, x.options().dtype(at::kFloat));
  if (q.numel() == 0) return {q, scales};
  p.x = xc.data_ptr();
  p.x_dtype = to_dsk_dtype(x.scalar_type());
  p.q = static_cast<uint8_t*>(q.data_ptr());
  p.scales = scales.data_ptr<float>();
  if (x.is_cuda()) {
#ifdef DSK_WITH_CUDA
    C10_CUDA_CHECK(static_cast<cudaError_t>(quantize_fp8_cuda(p, stream_of(x))));
#endif
  } else {
    quantize_fp8_cpu(p);
  }
  return {q, scales};
}

at::Tensor fp8_gemm(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& w,
                    const at::Tensor& w_scales, std::optional<at::ScalarType> out_dtype) {
  return run_fp8_gemm("fp8_gemm", a, a_scales, w, w_scales, std::nullopt, out_dtype);
}

at::Tensor fp8_grouped_gemm(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& w,
                            const at::Tensor& w_scales, const at::Tensor& offsets,
                            std::optional<at::ScalarType> out_dtype) {
  return run_fp8_gemm("fp8_grouped_gemm", a, a_scales, w, w_scales, offsets, out_dtype);
}

}  // namespace dsk::gemm

// A fragment here rather than in csrc/torch_bindings.cpp (as quant does): a
// private knob of this family only, with no tensor arguments (a catch-all
// kernel serves every device).
TORCH_LIBRARY_FRAGMENT(deepseek_kernels, m) {
  m.def("_gemm_cuda_kernel(int version=0) -> int", &dsk::gemm::gemm_cuda_kernel_op);
  m.def("_fp8_cuda_kernel(int version=0) -> int", &dsk::gemm::fp8_cuda_kernel_op);
  m.def("_int8_cuda_kernel(int version=0) -> int", &dsk::gemm::int8_cuda_kernel_op);
  m.def("_int8_cpu_sums(int version=0) -> int", &dsk::gemm::int8_cpu_sums_op);
  m.def("_gemm_cpu_bf16(int version=0) -> int", &dsk::gemm::gemm_cpu_bf16_op);
}
