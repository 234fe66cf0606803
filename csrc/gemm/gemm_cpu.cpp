// CPU kernels of the GEMM family. The floating-point inner products and their
// epilogue run in ATen (BLAS and its vectorized elementwise kernels, called by
// the glue in fp32/fp64), except bf16 on CPUs with AVX512-BF16 (below); here:
// that bf16 kernel, the exact INT8 and FP8 GEMMs and their quantization, all
// OpenMP-parallel through at::parallel_for. Compiled with -ffp-contract=off so the INT8
// scaling rounds exactly as on the GPU.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

// The AVX512-BF16 kernel needs x86-64 and a compiler with its intrinsics
// (GCC 10+, Clang 9+); elsewhere bf16 takes the fp32 BLAS path.
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define DSK_AVX512_BF16_KERNEL 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm/gemm_math.h"
#include "gemm/gemm_params.h"

namespace dsk::gemm {
namespace {

template <typename T, typename F>
inline void store_as(void* p, int64_t i, F v) {
  static_cast<T*>(p)[i] = static_cast<T>(v);
}

template <typename F>
inline void store_any(void* p, DType t, int64_t i, F v) {
  switch (t) {
    case DType::kFloat16: store_as<c10::Half>(p, i, static_cast<float>(v)); break;
    case DType::kBFloat16: store_as<c10::BFloat16>(p, i, static_cast<float>(v)); break;
    case DType::kFloat64: store_as<double>(p, i, v); break;
    default: store_as<float>(p, i, static_cast<float>(v)); break;
  }
}

// Round half to even for |v| <= 2^22 (exactly rintf on that range; see quant_cpu.cpp).
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

template <typename T>
void quantize_rows_typed(const QuantizeRowsParams& p) {
  const T* x = static_cast<const T*>(p.x);
  at::parallel_for(0, p.rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(p.cols, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * p.cols;
      float amax = 0.0f;
      bool finite = true;
      for (int64_t i = 0; i < p.cols; ++i) {
        const float v = static_cast<float>(xr[i]);
        finite = finite && std::isfinite(v);
        amax = std::max(amax, std::fabs(v));
      }
      float scale = amax / 127.0f;
      if (scale == 0.0f) scale = 1.0f;
      if (!finite) scale = std::numeric_limits<float>::quiet_NaN();
      p.scales[r] = scale;
      int8_t* qr = p.q + r * p.cols;
      for (int64_t i = 0; i < p.cols; ++i) {
        if (!finite) {
          qr[i] = 0;
          continue;
        }
        float c = round_half_even(static_cast<float>(xr[i]) / scale);
        c = std::min(std::max(c, -127.0f), 127.0f);
        qr[i] = static_cast<int8_t>(static_cast<int>(c));
      }
    }
  });
}

// Exact INT8 GEMM: blocks of rows x columns per task; the K loop accumulates
// in int32 (|acc| <= 128 * 128 * K fits for K <= 131,071, checked by the glue).
void int8_gemm_typed(const Int8GemmParams& p) {
  constexpr int64_t kBlockM = 16, kBlockN = 64;
  const int64_t mb = (p.m + kBlockM - 1) / kBlockM, nb = (p.n + kBlockN - 1) / kBlockN;
  at::parallel_for(0, mb * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / nb) * kBlockM, n0 = (t % nb) * kBlockN;
      const int64_t m1 = std::min(m0 + kBlockM, p.m), n1 = std::min(n0 + kBlockN, p.n);
      for (int64_t m = m0; m < m1; ++m) {
        const int8_t* ar = p.a + m * p.k;
        for (int64_t n = n0; n < n1; ++n) {
          int32_t acc = 0;
          if (p.acc) {
            acc = p.acc[m * p.n + n];
          } else {
            const int8_t* wr = p.w + n * p.k;
            for (int64_t k = 0; k < p.k; ++k)
              acc += static_cast<int32_t>(ar[k]) * static_cast<int32_t>(wr[k]);
          }
          float v = int8_dequant(acc, p.a_scales[m], p.w_scales[n]);
          if (p.bias) v = v + p.bias[n];
          store_any(p.out, p.out_dtype, m * p.n + n, v);
        }
      }
    }
  });
}

inline float fp8_to_float(uint8_t bits) {
  // All 256 e4m3 values, decoded once (a table lookup per element in the GEMM).
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b)
      t[b] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table[bits];
}

template <typename T>
void quantize_fp8_typed(const QuantizeFp8Params& p) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t row_blocks = (p.rows + p.block_rows - 1) / p.block_rows;
  const int64_t per_item = row_blocks * p.col_blocks;
  at::parallel_for(0, p.batch * per_item, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      // Block b: matrix b / per_item, then row-block-major; rows index the whole batch.
      const int64_t first = (b / per_item) * p.rows, rb = (b % per_item) / p.col_blocks;
      const int64_t r0 = first + rb * p.block_rows, c0 = (b % p.col_blocks) * kFp8Block;
      const int64_t r1 = first + std::min((rb + 1) * p.block_rows, p.rows);
      const int64_t c1 = std::min(c0 + kFp8Block, p.cols);
      float amax = 0.0f;
      bool finite = true;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) {
          const float v = static_cast<float>(x[r * p.cols + c]);
          finite = finite && std::isfinite(v);
          amax = std::max(amax, std::fabs(v));
        }
      }
      float scale = amax / 448.0f;
      if (scale == 0.0f) scale = 1.0f;
      if (!finite) scale = std::numeric_limits<float>::quiet_NaN();
      p.scales[b] = scale;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) {
          float v = finite ? static_cast<float>(x[r * p.cols + c]) / scale : 0.0f;
          v = std::min(std::max(v, -448.0f), 448.0f);
          p.q[r * p.cols + c] = c10::Float8_e4m3fn(v).x;
        }
      }
    }
  });
}

// Row blocks of at most `block_m` rows inside one group (a plain GEMM is one group).
struct Fp8RowBlock {
  int64_t m0 = 0, m1 = 0, group = 0;
};

std::vector<Fp8RowBlock> fp8_row_blocks(const Fp8GemmParams& p, int64_t block_m) {
  auto offset = [&](int64_t g) {
    return p.offsets_int64 ? static_cast<const int64_t*>(p.offsets)[g]
                           : static_cast<int64_t>(static_cast<const int32_t*>(p.offsets)[g]);
  };
  std::vector<Fp8RowBlock> blocks;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t lo = p.offsets ? offset(g) : 0, hi = p.offsets ? offset(g + 1) : p.m;
    for (int64_t m0 = lo; m0 < hi; m0 += block_m) blocks.push_back({m0, std::min(m0 + block_m, hi), g});
  }
  return blocks;
}

// a's rows and w's tile decoded to fp32 once per task; w's tile is stored
// transposed ([K][kBlockN]) so the innermost loop runs over 64 independent
// output columns: it vectorizes while every sum keeps the contract's order.
void fp8_gemm_typed(const Fp8GemmParams& p) {
  constexpr int64_t kBlockM = 16, kBlockN = 64;
  const std::vector<Fp8RowBlock> row_blocks = fp8_row_blocks(p, kBlockM);
  const int64_t mb = static_cast<int64_t>(row_blocks.size()), nb = (p.n + kBlockN - 1) / kBlockN;
  const int64_t w_scale_rows = (p.n + kFp8Block - 1) / kFp8Block;
  at::parallel_for(0, mb * nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> a_rows(static_cast<size_t>(kBlockM * p.k)), w_t(static_cast<size_t>(p.k * kBlockN));
    float w_scale[kBlockN], part[kBlockN], acc[kBlockN];
    for (int64_t t = t0; t < t1; ++t) {
      const Fp8RowBlock& rb = row_blocks[t / nb];
      const int64_t m0 = rb.m0, m1 = rb.m1, n0 = (t % nb) * kBlockN;
      const int64_t cols = std::min(kBlockN, p.n - n0);
      const uint8_t* w = p.w + rb.group * p.n * p.k;
      const float* w_scales = p.w_scales + rb.group * w_scale_rows * p.k_blocks;
      for (int64_t i = 0; i < (m1 - m0) * p.k; ++i) a_rows[i] = fp8_to_float(p.a[m0 * p.k + i]);
      std::fill(w_t.begin(), w_t.end(), 0.0f);  // columns past N stay 0 (never stored)
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t k = 0; k < p.k; ++k) w_t[k * kBlockN + j] = fp8_to_float(w[(n0 + j) * p.k + k]);
      for (int64_t m = m0; m < m1; ++m) {
        const float* ar = a_rows.data() + (m - m0) * p.k;
        std::fill(acc, acc + kBlockN, 0.0f);
        for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
          const int64_t k1 = std::min((kb + 1) * kFp8Block, p.k);
          std::fill(part, part + kBlockN, 0.0f);
          for (int64_t k = kb * kFp8Block; k < k1; ++k) {
            const float av = ar[k];
            const float* wk = w_t.data() + k * kBlockN;
            for (int64_t j = 0; j < kBlockN; ++j) part[j] = part[j] + av * wk[j];
          }
          const float a_scale = p.a_scales[m * p.k_blocks + kb];
          for (int64_t j = 0; j < kBlockN; ++j)
            w_scale[j] = w_scales[(std::min(n0 + j, p.n - 1) / kFp8Block) * p.k_blocks + kb];
          for (int64_t j = 0; j < kBlockN; ++j) acc[j] = acc[j] + (part[j] * a_scale) * w_scale[j];
        }
        for (int64_t j = 0; j < cols; ++j) store_any(p.out, p.out_dtype, m * p.n + n0 + j, acc[j]);
      }
    }
  });
}

// bf16 GEMM on AVX512-BF16. vdpbf16ps adds, per fp32 lane j, the products of
// the lane's two bf16 halves: acc[j] += a.lo * b[j].lo + a.hi * b[j].hi. So w is
// packed in panels of kBf16NR = 32 columns, [K/2 pairs][32 columns] of 32-bit
// pairs (w[n][2p] low, w[n][2p + 1] high; a missing last element of an odd K
// and the columns past N are zero), and a row of a is read a pair at a time,
// broadcast to every lane. A micro-tile of MR <= 8 rows x 32 columns keeps 16
// zmm accumulators; K runs in blocks of kBf16KC, each summed afresh and added
// to acc (fp32 BLAS-like error growth, ~5x less than one chain over K = 2048).
#ifdef DSK_AVX512_BF16_KERNEL
constexpr int64_t kBf16NR = 32, kBf16MR = 8, kBf16KC = 256, kBf16MChunk = 512;

// Panel pn of w packed into dst, kStage pairs at a time: the panel's rows are
// first copied side by side into a small buffer (each row a sequential read;
// gathering straight from w, whose rows are K apart, missed L1 on most lanes),
// then pair q of 16 rows comes out of the buffer by one gather. Rows past N are
// masked to 0; an odd K's last element pairs with 0.
__attribute__((target("avx512f,avx512bw"))) void pack_bf16_panel(const Bf16MatmulParams& p, int64_t pn,
                                                                 uint32_t* dst) {
  constexpr int64_t kStage = 64;  // pairs per row and stage: 256 bytes
  const int64_t full = p.k / 2, n0 = pn * kBf16NR, cols = std::min(kBf16NR, p.n - n0);
  alignas(64) uint32_t stage[kBf16NR * kStage];
  __m512i idx[2];
  __mmask16 live[2];
  for (int h = 0; h < 2; ++h) {
    alignas(64) int32_t off[16];
    for (int j = 0; j < 16; ++j) off[j] = static_cast<int32_t>((h * 16 + j) * kStage);
    idx[h] = _mm512_load_si512(off);
    const int64_t rows = std::clamp<int64_t>(cols - h * 16, 0, 16);
    live[h] = rows >= 16 ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
  }
  for (int64_t q0 = 0; q0 < full; q0 += kStage) {
    const int64_t nq = std::min(kStage, full - q0);
    for (int64_t j = 0; j < cols; ++j)
      std::memcpy(stage + j * kStage, p.w + (n0 + j) * p.k + 2 * q0, nq * sizeof(uint32_t));
    for (int64_t q = 0; q < nq; ++q)
      for (int h = 0; h < 2; ++h) {
        const __m512i at = _mm512_add_epi32(idx[h], _mm512_set1_epi32(static_cast<int32_t>(q)));
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live[h], at, stage, 4);
        _mm512_storeu_si512(dst + (q0 + q) * kBf16NR + h * 16, v);
      }
  }
  if (p.k % 2)
    for (int64_t j = 0; j < kBf16NR; ++j) dst[full * kBf16NR + j] = j < cols ? p.w[(n0 + j) * p.k + p.k - 1] : 0u;
}

// c[MR x nr] (+)= a[MR x k] . panel, k <= kBf16KC (a and the panel start at the
// same pair), row strides lda and ldc; add: accumulate into c.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void bf16_micro_tile(
    const uint16_t* a, int64_t lda, const uint32_t* panel, int64_t k, float* c, int64_t ldc, int64_t nr,
    bool add) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const int64_t full = k / 2;
  for (int64_t q = 0; q <= full; ++q) {
    if (q == full && k % 2 == 0) break;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + q * kBf16NR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + q * kBf16NR + 16);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t pair = 0;  // an odd K's last element pairs with 0 (never read past the row)
      if (q < full) std::memcpy(&pair, a + i * lda + 2 * q, sizeof pair);
      else pair = a[i * lda + 2 * q];
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
    }
  }
  const __mmask16 m0 = nr >= 16 ? __mmask16(0xffff) : __mmask16((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? __mmask16(0xffff) : nr <= 16 ? __mmask16(0) : __mmask16((1u << (nr - 16)) - 1);
  for (int i = 0; i < MR; ++i) {
    if (add) {
      acc[i][0] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c + i * ldc), acc[i][0]);
      acc[i][1] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c + i * ldc + 16), acc[i][1]);
    }
    _mm512_mask_storeu_ps(c + i * ldc, m0, acc[i][0]);
    _mm512_mask_storeu_ps(c + i * ldc + 16, m1, acc[i][1]);
  }
}

using Bf16MicroTile = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, float*, int64_t, int64_t, bool);
constexpr Bf16MicroTile kBf16MicroTiles[kBf16MR + 1] = {
    nullptr, bf16_micro_tile<1>, bf16_micro_tile<2>, bf16_micro_tile<3>, bf16_micro_tile<4>,
    bf16_micro_tile<5>, bf16_micro_tile<6>, bf16_micro_tile<7>, bf16_micro_tile<8>};
// Few rows (decoding): every output a dot product along K, a and w both read in
// place (packing w would cost more than the products): 32 bf16 of a row of a
// and of a row of w at a time into 16 fp32 lanes (the tail of K by a masked
// load), the lanes summed pairwise at the end; one tile of all M <= kBf16Tile
// rows of a by NR <= kBf16Tile rows of w keeps up to 16 accumulators.
constexpr int64_t kBf16Tile = 4;

template <int MR, int NR>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void bf16_dot_tile(const Bf16MatmulParams& p,
                                                                          int64_t n0) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < p.k; k0 += 32) {
    const int64_t left = p.k - k0;
    const __mmask32 mask = left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1);
    __m512bh w[NR];
    for (int j = 0; j < NR; ++j) w[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, p.w + (n0 + j) * p.k + k0);
    for (int i = 0; i < MR; ++i) {
      const __m512bh a = (__m512bh)_mm512_maskz_loadu_epi16(mask, p.a + i * p.k + k0);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, w[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float lanes[16];
      _mm512_storeu_ps(lanes, acc[i][j]);
      for (int h = 8; h >= 1; h /= 2)
        for (int l = 0; l < h; ++l) lanes[l] += lanes[l + h];
      p.acc[i * p.n + n0 + j] = lanes[0];
    }
}

using Bf16DotTile = void (*)(const Bf16MatmulParams&, int64_t);
template <int MR>
constexpr std::array<Bf16DotTile, kBf16Tile + 1> bf16_tiles_of_rows() {
  return {nullptr, bf16_dot_tile<MR, 1>, bf16_dot_tile<MR, 2>, bf16_dot_tile<MR, 3>, bf16_dot_tile<MR, 4>};
}
constexpr std::array<std::array<Bf16DotTile, kBf16Tile + 1>, kBf16Tile + 1> kBf16DotTiles = {
    std::array<Bf16DotTile, kBf16Tile + 1>{}, bf16_tiles_of_rows<1>(), bf16_tiles_of_rows<2>(),
    bf16_tiles_of_rows<3>(), bf16_tiles_of_rows<4>()};
#endif  // DSK_AVX512_BF16_KERNEL

}  // namespace

bool bf16_dot_products_available() {
#ifdef DSK_AVX512_BF16_KERNEL
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

void bf16_matmul_cpu(const Bf16MatmulParams& p) {
#ifdef DSK_AVX512_BF16_KERNEL
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {
    std::fill(p.acc, p.acc + p.m * p.n, 0.0f);
    return;
  }
  if (p.m <= kBf16Tile) {
    at::parallel_for(0, (p.n + kBf16Tile - 1) / kBf16Tile, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t n0 = b0 * kBf16Tile; n0 < std::min(p.n, b1 * kBf16Tile); n0 += kBf16Tile)
        kBf16DotTiles[p.m][std::min(kBf16Tile, p.n - n0)](p, n0);
    });
    return;
  }
  // Tasks: one panel against a chunk of kBf16MChunk rows. The task packs its
  // panel into the thread's buffer (K x 128 bytes: stays in L2, kept across
  // calls, so no fresh pages), then runs the chunk's micro-tiles over it.
  const int64_t pairs = (p.k + 1) / 2, panels = (p.n + kBf16NR - 1) / kBf16NR;
  const int64_t chunks = (p.m + kBf16MChunk - 1) / kBf16MChunk;
  at::parallel_for(0, chunks * panels, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<uint32_t> panel_buf;
    if (panel_buf.size() < static_cast<size_t>(pairs * kBf16NR)) panel_buf.resize(pairs * kBf16NR);
    uint32_t* panel = panel_buf.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mc = t / panels, pn = t % panels;
      const int64_t m_end = std::min(p.m, (mc + 1) * kBf16MChunk);
      const int64_t n0 = pn * kBf16NR, nr = std::min(kBf16NR, p.n - n0);
      pack_bf16_panel(p, pn, panel);
      for (int64_t m0 = mc * kBf16MChunk; m0 < m_end; m0 += kBf16MR) {
        const int64_t mr = std::min(kBf16MR, m_end - m0);
        for (int64_t k0 = 0; k0 < p.k; k0 += kBf16KC)  // kBf16KC is even: blocks start on a pair
          kBf16MicroTiles[mr](p.a + m0 * p.k + k0, p.k, panel + (k0 / 2) * kBf16NR,
                              std::min(kBf16KC, p.k - k0), p.acc + m0 * p.n + n0, p.n, nr, k0 > 0);
      }
    }
  });
#else
  (void)p;  // the glue calls it only where bf16_dot_products_available()
#endif
}

void quantize_fp8_cpu(const QuantizeFp8Params& p) {
  if (p.batch == 0 || p.rows == 0 || p.cols == 0) return;
  switch (p.x_dtype) {
    case DType::kFloat16: quantize_fp8_typed<c10::Half>(p); break;
    case DType::kBFloat16: quantize_fp8_typed<c10::BFloat16>(p); break;
    default: quantize_fp8_typed<float>(p); break;
  }
}

void fp8_gemm_cpu(const Fp8GemmParams& p) {
  if (p.m == 0 || p.n == 0) return;
  fp8_gemm_typed(p);
}

void int8_gemm_cpu(const Int8GemmParams& p) {
  if (p.m == 0 || p.n == 0) return;
  int8_gemm_typed(p);
}

void quantize_rows_int8_cpu(const QuantizeRowsParams& p) {
  if (p.rows == 0) return;
  switch (p.x_dtype) {
    case DType::kFloat16: quantize_rows_typed<c10::Half>(p); break;
    case DType::kBFloat16: quantize_rows_typed<c10::BFloat16>(p); break;
    default: quantize_rows_typed<float>(p); break;
  }
}

}  // namespace dsk::gemm
