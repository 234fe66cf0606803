// Epilogue activations (shared by the CPU and CUDA kernels through
// DSK_HOST_DEVICE, so both compute the same formulas) and the INT8 scaling step.
#pragma once

#include <cmath>

#include "common/host_device.h"
#include "gemm/gemm_params.h"

namespace dsk::gemm {

// erf/tanh/exp overloads for float and double (gradcheck runs in fp64 on the CPU).
DSK_HOST_DEVICE float act_erf(float x) { return erff(x); }
DSK_HOST_DEVICE double act_erf(double x) { return erf(x); }
DSK_HOST_DEVICE float act_tanh(float x) { return tanhf(x); }
DSK_HOST_DEVICE double act_tanh(double x) { return tanh(x); }
DSK_HOST_DEVICE float act_exp(float x) { return expf(x); }
DSK_HOST_DEVICE double act_exp(double x) { return exp(x); }

// The activations of torch.nn.functional: relu, gelu (erf), gelu(approximate="tanh"), silu.
template <typename F>
DSK_HOST_DEVICE F apply_activation(F x, Activation act) {
  const F half = F(0.5), one = F(1);
  switch (act) {
    case Activation::kRelu: return x > F(0) ? x : F(0);
    case Activation::kGelu: return half * x * (one + act_erf(x * F(0.70710678118654752440)));
    case Activation::kGeluTanh: {
      const F inner = F(0.79788456080286535588) * (x + F(0.044715) * x * x * x);
      return half * x * (one + act_tanh(inner));
    }
    case Activation::kSilu: return x / (one + act_exp(-x));
    default: return x;
  }
}

// INT8 W8A8 scaling, fixed order of fp32 operations (see gemm_params.h); used
// by the CPU kernel (-ffp-contract=off). The CUDA kernel spells the same steps
// with __fmul_rn/__fadd_rn so nvcc cannot fuse the bias add into an FMA.
DSK_HOST_DEVICE float int8_dequant(int acc, float a_scale, float w_scale) {
  const float prod = static_cast<float>(acc) * a_scale;
  return prod * w_scale;
}

}  // namespace dsk::gemm
