// Plain parameter structs and launchers for the GEMM family. Filled by
// gemm_api.cpp (which validates the tensors); CPU kernels in gemm_cpu.cpp,
// CUDA kernels in gemm_cuda.cu. Kernels see raw pointers only.
//
// Layouts (all row-major, contiguous): a [M, K], weight [N, K] (nn.Linear),
// out [M, N]; out = act(a @ weight^T + bias), accumulated in fp32 (fp64 for
// fp64 inputs on the CPU).
//
// Grouped: rows of a are packed by group; group g owns rows
// [offsets[g], offsets[g + 1]) and multiplies them by weight[g] ([N, K]).
//
// INT8 W8A8 arithmetic contract (CPU, CUDA and reference.py agree bitwise):
//   acc = sum_k int32(a[m, k]) * int32(w[n, k])            (exact in int32)
//   out = ((float(acc) * a_scale[m]) * w_scale[n]) + bias[n] (fp32, no FMA),
//   then rounded to the output dtype.
// Row-wise INT8 quantization: scale = amax / 127 (1 when amax == 0; NaN, with
//   all codes 0, when the row holds NaN/Inf); code = clamp(rint(x / scale)).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dsk::gemm {

enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4 };

struct GemmParams {
  const void* a = nullptr;       // [M, K], dtype ab_dtype
  const void* b = nullptr;       // [groups, N, K], dtype ab_dtype
  const float* bias = nullptr;   // [N] fp32, or nullptr
  void* out = nullptr;           // [M, N], dtype out_dtype
  DType ab_dtype = DType::kBFloat16;
  DType out_dtype = DType::kBFloat16;
  int64_t m = 0, n = 0, k = 0;
  // Grouped GEMM: offsets [groups + 1] (int32 or int64) on the data's device;
  // nullptr for a plain GEMM (one group, rows [0, M)).
  const void* offsets = nullptr;
  bool offsets_int64 = false;
  int64_t groups = 1;
  Activation activation = Activation::kNone;
  // CUDA bf16/fp16 kernel generation: 1 (mma.sync 128x128 / 64x64 tiles), 2
  // (128x256 tiles, deeper pipeline), 3 (wgmma, sm_90a; v2 where it cannot run)
  // or kGemmKernelAuto (v3, else v2, where 128 x 256 tiles fill a wave; v1 below).
  // Filled by the glue (DSK_GEMM_KERNEL / _gemm_cuda_kernel).
  int cuda_kernel = 1;
  // Whether the build holds sm_90a code (v3's wgmma): from the build's arch list.
  bool built_sm90a = false;
  // v3 loads its tiles with TMA (tensor maps made per call; cp.async where one
  // cannot be made): the glue's default, DSK_GEMM_TMA=0 turns it off.
  bool v3_tma = true;
  // v3 skips the wgmma of a warpgroup with no rows in its tile (a group's last
  // tile of at most 64 rows: about half the groups at DeepSeek-V3 expert shapes).
  // Opt-in (DSK_GEMM_SKIP_EMPTY_ROWS=1, read once): passes its tests on an H100.
  bool v3_skip_empty_rows = false;
  // v3 (TMA) runs plain GEMMs in clusters of two CTAs along M that multicast the
  // B tile they share (gemm_cuda.cu, wgmma_gemm_body). Opt-in
  // (DSK_GEMM_CLUSTER=1, read once): passes its tests on an H100, not yet benchmarked.
  bool v3_cluster = false;
  // v3 (TMA) copies its tiles one tile further ahead (three instead of two),
  // refilling the stage of the tile just finished (gemm_cuda.cu, kDeep). Opt-in
  // (DSK_GEMM_DEEP_PREFETCH=1, read once): passes its tests on an H100, not yet benchmarked.
  bool v3_deep_prefetch = false;
  // v3 (TMA) warp-specialized and persistent: a producer warpgroup issues the
  // copies, two consumer warpgroups synchronize with it through per-stage
  // mbarriers only (gemm_cuda.cu, ws_gemm_kernel; v3's bits); with v3_cluster in
  // clusters of two (plain GEMMs). Takes precedence over the deep variant.
  // Opt-in (DSK_GEMM_WARP_SPECIALIZED=1, read once): on an H100 no faster than v3.
  bool v3_warp_specialized = false;
  // The warp-specialized kernels release a stage with one mbarrier arrival per
  // consumer warp instead of one per thread (8 instead of 256 a CTA, and as many
  // remote ones in clusters, those without the GPU-wide fence of a cluster-scope
  // release): the same math and bits. Opt-in for both families
  // (DSK_WS_WARP_ARRIVALS=1, read once): not yet run on a GPU.
  bool v3_ws_warp_arrivals = false;
};

// The generation new GEMM params get: 1, 2 or 3 (forced), or kGemmKernelAuto (the
// default: v3 (wgmma, sm_90a), else v2, where 128 x 256 tiles fill a wave of the
// GPU, v1 below; measured on an H100 at 4096^3 and 8192^3, v3 is 86-91% of cuBLAS,
// v2 48-54%, v1 26-29%). Starts from the environment variable DSK_GEMM_KERNEL
// (auto, v1/1, v2/2 or v3/3), read once; the private op _gemm_cuda_kernel switches
// it at run time (tests, the benchmark's A/B).
constexpr int kGemmKernelAuto = 4;

struct Int8GemmParams {
  const int8_t* a = nullptr;        // [M, K]
  const float* a_scales = nullptr;  // [M]
  const int8_t* w = nullptr;        // [N, K]
  const float* w_scales = nullptr;  // [N]
  const float* bias = nullptr;      // [N] fp32, or nullptr
  void* out = nullptr;              // [M, N], dtype out_dtype
  // CPU: [M, N] exact int32 sums computed beforehand (torch's int8 matmul, where it
  // is fast), or nullptr: the kernel sums. Exact either way, so the same bits.
  const int32_t* acc = nullptr;
  DType out_dtype = DType::kBFloat16;
  int64_t m = 0, n = 0, k = 0;
  // CUDA kernel: 1 dp4a; 2 (the default) tensor cores (mma.sync s8, K % 16 == 0,
  // else 1), bitwise the same results. Filled by the glue (DSK_INT8_KERNEL / _int8_cuda_kernel).
  int cuda_kernel = 1;
};

struct QuantizeRowsParams {
  const void* x = nullptr;  // [rows, cols], dtype x_dtype
  DType x_dtype = DType::kFloat32;
  int8_t* q = nullptr;      // [rows, cols]
  float* scales = nullptr;  // [rows]
  int64_t rows = 0, cols = 0;
};

// FP8 e4m3 block-scaled (DeepSeek-V3 recipe). Arithmetic contract (CPU, the
// CUDA kernel and reference.py agree bitwise):
//   quantize: block = (1, 128) or (128, 128) elements; scale = amax / 448 in fp32
//     (1 when 0; NaN with codes 0 for a block holding NaN/Inf);
//     code = e4m3(clamp(x / scale, -448, 448)), round to nearest even.
//   gemm: for each 128-wide K block kb in ascending order (the last may be short)
//     part = fp32 sum over k ascending of float(a[m, k]) * float(w[n, k])
//     acc  = acc + (part * a_scales[m, kb]) * w_scales[n / 128, kb]   (fp32, no FMA)
//   then one rounding of acc to the output dtype.
constexpr int64_t kFp8Block = 128;

struct QuantizeFp8Params {
  const void* x = nullptr;  // [batch, rows, cols], dtype x_dtype
  DType x_dtype = DType::kFloat32;
  uint8_t* q = nullptr;     // e4m3 bit patterns, [batch, rows, cols]
  float* scales = nullptr;  // [batch, ceil(rows / block_rows), ceil(cols / 128)]
  int64_t batch = 1;        // matrices quantized independently (e.g. experts' weights)
  int64_t rows = 0, cols = 0;
  int64_t block_rows = 1;   // 1 or 128
  int64_t col_blocks = 0;
};

// Grouped (fp8_grouped_gemm): rows of a are packed by group as in GemmParams;
// group g multiplies its rows by w[g] ([N, K]) scaled by w_scales[g].
struct Fp8GemmParams {
  const uint8_t* a = nullptr;       // e4m3 [M, K]
  const float* a_scales = nullptr;  // [M, k_blocks]
  const uint8_t* w = nullptr;       // e4m3 [groups, N, K]
  const float* w_scales = nullptr;  // [groups, ceil(N / 128), k_blocks]
  void* out = nullptr;              // [M, N], dtype out_dtype
  DType out_dtype = DType::kBFloat16;
  int64_t m = 0, n = 0, k = 0, k_blocks = 0;
  // offsets [groups + 1] (int32 or int64) on the data's device; nullptr for one group.
  const void* offsets = nullptr;
  bool offsets_int64 = false;
  int64_t groups = 1;
  // CUDA kernel: 1 the exact SIMT kernel of the contract above; 2 tensor cores
  // with mma.sync e4m3 (sm_89+); 3 (the default) wgmma (sm_90a builds on cc 9.0).
  // Both need K % 16 == 0; where one cannot run the next lower runs. v2/v3 sum
  // each 128-wide block on the tensor cores, in their order: within that
  // rounding of the contract, not bitwise. Filled by the glue (DSK_FP8_KERNEL /
  // _fp8_cuda_kernel).
  int cuda_kernel = 1;
  bool built_sm90a = false;  // whether the build holds sm_90a code (v3)
  // v3 loads its stages with TMA (tensor maps made per call; cp.async where one
  // cannot be made) instead of cp.async: implied by warp specialization (the
  // default); without it opt-in with DSK_FP8_TMA=1.
  bool v3_tma = false;
  // With TMA: all stages filled ahead, each refilled right after its block's
  // promotion (DSK_FP8_DEEP_PREFETCH=1); plain GEMMs in clusters of two CTAs
  // multicasting the W tile they share, deep prefetch included
  // (DSK_FP8_CLUSTER=1). Either turns TMA on. Opt-in (they pass their tests on
  // an H100; not benchmarked there yet). With warp specialization (the default),
  // DSK_FP8_CLUSTER=1 gives its clusters (slower on an H100: 456 TFLOP/s, 810 without).
  bool v3_deep_prefetch = false;
  bool v3_cluster = false;
  // Warp-specialized and persistent, with TMA (gemm_cuda.cu, fp8_ws_gemm_kernel;
  // the bits of v3): a producer warpgroup and two consumers that meet only at
  // per-stage mbarriers, so one consumer's promotion overlaps the other's wgmma;
  // with v3_cluster in clusters of two (plain GEMMs). Takes precedence over deep
  // prefetch. The default (DSK_FP8_WARP_SPECIALIZED=0 turns it off; read once).
  bool v3_warp_specialized = false;
  // The warp-specialized kernel promotes a block with one fused operation,
  // acc = fma(part, a_scale * w_scale, acc), instead of the contract's three
  // (a third of the promotion's fp32 work; not v3's bits: within the contract's
  // rounding, as the tensor cores' block sums are). The default with warp
  // specialization (DSK_FP8_FMA_PROMOTION=0 turns it off; read once).
  bool v3_fma_promotion = false;
  // As GemmParams::v3_ws_warp_arrivals (DSK_WS_WARP_ARRIVALS=1).
  bool v3_ws_warp_arrivals = false;
};

void quantize_fp8_cpu(const QuantizeFp8Params& p);
void fp8_gemm_cpu(const Fp8GemmParams& p);

void int8_gemm_cpu(const Int8GemmParams& p);
void quantize_rows_int8_cpu(const QuantizeRowsParams& p);

// CPU bf16 GEMM on the AVX512-BF16 dot products (vdpbf16ps): the fp32
// accumulator acc[M, N] = a[M, K] . w[N, K]^T, bf16 products exact, summed in
// fp32 (per 256-wide K block, the blocks added in order; for M <= 4 in 16
// lanes along K, summed pairwise). The glue runs the epilogue on acc, as it
// does on the fp32 BLAS path's.
struct Bf16MatmulParams {
  const uint16_t* a = nullptr;  // [M, K] bf16 bits, row-major
  const uint16_t* w = nullptr;  // [N, K] bf16 bits, row-major
  float* acc = nullptr;         // [M, N]
  int64_t m = 0, n = 0, k = 0;
};
// Whether this CPU has the instructions (AVX512F, AVX512BW and AVX512-BF16).
bool bf16_dot_products_available();
void bf16_matmul_cpu(const Bf16MatmulParams& p);

#ifdef DSK_WITH_CUDA
// Launch on `stream` (a cudaStream_t); return the launch's cudaError_t as int.
// gemm_cuda: bf16/fp16 on tensor cores (mma.sync, sm_80+), K % 8 == 0 and
// 16-byte aligned a/b required (the glue pads otherwise); fp32 on a SIMT kernel.
int gemm_cuda(const GemmParams& p, void* stream);
int int8_gemm_cuda(const Int8GemmParams& p, void* stream);
int quantize_rows_int8_cuda(const QuantizeRowsParams& p, void* stream);
// FP8: exact SIMT kernels (any sm_80+), or tensor cores (v2, opt-in, sm_89+).
int quantize_fp8_cuda(const QuantizeFp8Params& p, void* stream);
int fp8_gemm_cuda(const Fp8GemmParams& p, void* stream);
#endif

}  // namespace dsk::gemm
