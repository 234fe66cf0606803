// The fp32 arithmetic of MoE gating shared by the CPU kernels (plain C++) and
// the CUDA kernels, operation for operation, so both agree bitwise with each
// other and with deepseek_kernels/reference.py (see moe_params.h for the
// contract). On the device every product and sum is an explicit _rn intrinsic
// (nvcc may not contract them into FMAs); the CPU build uses -ffp-contract=off.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace dsk::moe {

#if defined(__CUDA_ARCH__)
DSK_HOST_DEVICE float fmul(float a, float b) { return __fmul_rn(a, b); }
DSK_HOST_DEVICE float fadd(float a, float b) { return __fadd_rn(a, b); }
DSK_HOST_DEVICE float fsub(float a, float b) { return __fsub_rn(a, b); }
DSK_HOST_DEVICE float fdiv(float a, float b) { return __fdiv_rn(a, b); }
DSK_HOST_DEVICE double fmul(double a, double b) { return __dmul_rn(a, b); }
DSK_HOST_DEVICE double fadd(double a, double b) { return __dadd_rn(a, b); }
DSK_HOST_DEVICE double fsub(double a, double b) { return __dsub_rn(a, b); }
DSK_HOST_DEVICE double fdiv(double a, double b) { return __ddiv_rn(a, b); }
#else
template <typename S> inline S fmul(S a, S b) { return a * b; }
template <typename S> inline S fadd(S a, S b) { return a + b; }
template <typename S> inline S fsub(S a, S b) { return a - b; }
template <typename S> inline S fdiv(S a, S b) { return a / b; }
#endif

// Below this the library's exp is 0 (also for -inf).
constexpr float kExpCutoff = -87.0f;
// Tokens per partial sum of mean_scores (part of the bitwise contract).
constexpr int64_t kScoreSumChunk = 8;
// Width of the strided partial sums of the softmax denominator.
constexpr int kSumLanes = 32;
// mean_scores: chunk partials are summed in kMeanLanes strided sequential sums
// (chunk c goes to lane c % kMeanLanes), then halved kMeanLanes/2, ..., 1.
constexpr int kMeanLanes = 256;

// exp(x) for x <= 0 from fp32 multiplies and adds only (no libm: libm and
// CUDA's expf differ in the last bit). Relative error < 4e-7.
// The host form has no branch, so the CPU's loops over a row vectorize: x is
// clamped into range and the result selected afterwards, and n = rint(t) is
// (t + 1.5 * 2^23) - 1.5 * 2^23, the same round-half-to-even for |t| < 2^22
// (here |t| < 127; its -0 for a t in (-0.5, -0] is +0, which changes no bit
// of the result).
DSK_HOST_DEVICE float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  if (x < kExpCutoff) return 0.0f;
  const float xc = x;
  const float n = rintf(fmul(xc, 0x1.715476p+0f));  // x * log2(e), half to even
#else
  const float xc = x < kExpCutoff ? kExpCutoff : x;  // also -inf; the result is selected below
  const float n = fsub(fadd(fmul(xc, 0x1.715476p+0f), 0x1.8p23f), 0x1.8p23f);
#endif
  const float r = fsub(fsub(xc, fmul(n, 0x1.62e4p-1f)), fmul(n, 0x1.7f7d1cp-20f));
  float p = 0x1.a01a02p-13f;  // 1/7!
  p = fadd(fmul(p, r), 0x1.6c16c2p-10f);
  p = fadd(fmul(p, r), 0x1.111112p-7f);
  p = fadd(fmul(p, r), 0x1.555556p-5f);
  p = fadd(fmul(p, r), 0x1.555556p-3f);
  p = fadd(fmul(p, r), 0x1p-1f);
  p = fadd(fmul(p, r), 1.0f);
  p = fadd(fmul(p, r), 1.0f);
  int ni = static_cast<int>(n);
  ni = ni < -126 ? -126 : (ni > 0 ? 0 : ni);
  const uint32_t bits = static_cast<uint32_t>(ni + 127) << 23;
  float scale;
#if defined(__CUDA_ARCH__)
  scale = __uint_as_float(bits);
  return fmul(p, scale);
#else
  std::memcpy(&scale, &bits, sizeof(scale));
  const float v = fmul(p, scale);
  return x < kExpCutoff ? 0.0f : v;
#endif
}

// fp64 (CPU only, for gradcheck): libm's exp, no bitwise contract.
inline double exp_nonpos(double x) { return std::exp(x); }

template <typename S>
DSK_HOST_DEVICE S sigmoid_score(S x) {
  const S t = exp_nonpos(x >= S(0) ? -x : x);
  return x >= S(0) ? fdiv(S(1), fadd(S(1), t)) : fdiv(t, fadd(S(1), t));
}

}  // namespace dsk::moe
