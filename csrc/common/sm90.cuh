// Hopper (sm_90a) building blocks shared by the GEMM and attention kernels:
// the 128-byte swizzled shared-memory layout and its cp.async loader, wgmma
// (matrix descriptors, fences, the instruction wrappers), mbarriers and TMA.
// No torch headers. The instructions compile for sm_90a only
// (__CUDA_ARCH_FEAT_SM90_ALL); kernels using them trap elsewhere and their
// launchers check the device first.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"

namespace dsk {

// Copies ROWS rows x 128 bytes into the 128-byte swizzled layout wgmma (and
// TMA's SWIZZLE_128B) use, at shared address `dst` (1 KiB aligned): 16-byte chunk
// c of row r lands at chunk c ^ (r % 8). Row r is bytes [k0, k0 + 128) of row
// row0 + r of `src`, whose rows are row_stride bytes apart and k_bytes long;
// rows past row_end and chunks past k_bytes are zero-filled. THREADS threads.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_swizzled_rows(uint32_t dst, const void* src, int64_t row0,
                                                   int64_t row_end, int64_t k0, int64_t k_bytes,
                                                   int64_t row_stride) {
  const unsigned char* bytes = static_cast<const unsigned char*>(src);
#pragma unroll
  for (int c = threadIdx.x; c < ROWS * 8; c += THREADS) {
    const int row = c >> 3, chunk = c & 7;
    const int64_t grow = row0 + row, gk = k0 + chunk * 16;
    const bool valid = grow < row_end && gk < k_bytes;
    cp_async_16(dst + row * 128 + ((chunk ^ (row & 7)) << 4),
                valid ? bytes + grow * row_stride + gk : bytes, valid);
  }
}

// The device helpers below are sm_90a instructions, compiled for that target
// only; the kernel traps elsewhere (and is never launched there).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Matrix descriptor of a K-major, 128-byte-swizzled operand starting at `addr`:
// start address >> 4 (bits 0-13), leading byte offset 16 B (unused for this
// layout), stride byte offset 1024 B (bits 32-45), swizzle mode 1 = 128 B (bits 62-63).
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (uint64_t{16 >> 4} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// Matrix descriptor of an MN-major (N contiguous), 128-byte-swizzled B operand
// at `addr`, used with imm-trans-b = 1 (16-bit types only): the same bytes as a
// K-major tile whose rows are the K index (8-row, 1024-byte atoms, the stride
// byte offset, one per 8 of K) and whose 64-element column blocks lie
// n_block_bytes apart (the leading byte offset, one per 64 of N). A K step of 16
// advances `addr` by 2048 bytes.
__device__ __forceinline__ uint64_t wgmma_desc_mn(uint32_t addr, uint32_t n_block_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) |
         (static_cast<uint64_t>((n_block_bytes & 0x3FFFFu) >> 4) << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Named barrier `id` (1..15; 0 is __syncthreads') over `threads` threads (a
// multiple of 32), e.g. one warpgroup's.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Bulk asynchronous reduction by the TMA unit: `bytes` bytes of fp32 at shared
// address `src` added element-wise into global `dst` (both 16-byte aligned, bytes
// a multiple of 16), in this thread's open bulk async-group. The shared memory
// must be handed to the async proxy first (fence_proxy_async by its writers).
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
               "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until this thread's bulk groups have read their shared memory sources.
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
// Until they are complete: their writes performed.
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// TMA: a 2-D tile of `map` at element coordinates (inner, outer) into shared
// memory at `dst`, completing `bytes` of the transaction count of mbarrier `bar`.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// One arrival on mbarrier `bar` (a consumer releasing a stage).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Until the phase of `bar` with this parity completed; a fresh barrier counts the
// phase before its first as completed with parity 1.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (done == 0);
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int32_t inner,
                                            int32_t outer, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(inner), "r"(outer), "r"(bar)
      : "memory");
}

// The same load into the shared memory of every CTA of the cluster in cta_mask
// (bit r: cluster rank r), at the same offset `dst`, each completing `bytes` on
// its own mbarrier at offset `bar`.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map,
                                                      int32_t inner, int32_t outer, uint32_t bar,
                                                      uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(inner), "r"(outer), "r"(bar), "h"(cta_mask)
      : "memory");
}

// Thread block clusters: this CTA's rank, and the cluster-wide barrier split in
// its two halves (every thread of every CTA arrives, then waits; arrive releases
// and wait acquires, so shared-memory reads before an arrive are done for
// whoever passes the wait).
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}
// The address of shared-memory location `addr` (this CTA's) in the CTA of cluster
// rank `rank`, and one arrival (releasing this thread's prior accesses at cluster
// scope) on the mbarrier at such an address.
__device__ __forceinline__ uint32_t cluster_map_shared(uint32_t addr, uint32_t rank) {
  uint32_t mapped;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(mapped) : "r"(addr), "r"(rank));
  return mapped;
}
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t cluster_addr) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr)
               : "memory");
}
// The same arrival with the instruction's default semantics (release at CTA
// scope), as CUTLASS's cluster barriers arrive: the cluster-scope release above
// compiles to a GPU-wide memory fence before each arrival, which also waits for
// the thread's outstanding global stores. Enough where the arrival only says that
// reads (e.g. completed wgmma reads of a stage) are done.
__device__ __forceinline__ void mbar_arrive_remote(uint32_t cluster_addr) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr) : "memory");
}

// Warp specialization: the executing warpgroup's per-thread register count
// becomes N (a multiple of 8 in [24, 256]); every warp of the warpgroup runs it.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// A TMA pipeline's stage barriers: thread 0 makes one mbarrier per stage (one
// arrival each: the thread that arms it with the stage's expect_tx) and fences
// them for the async proxy, then the CTA synchronizes.
template <int kStages>
__device__ __forceinline__ void init_stage_barriers(uint64_t (&full)[kStages], int tid) {
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(shared_addr(&full[s]), 1);
    fence_mbar_init();  // visible to the async proxy (TMA's complete_tx)
  }
  __syncthreads();
}

// Until the stage of tile t (t % kStages) holds it: phase t / kStages of its mbarrier.
template <int kStages>
__device__ __forceinline__ void wait_stage(uint64_t (&full)[kStages], int64_t t) {
  mbar_wait(shared_addr(&full[t % kStages]), static_cast<uint32_t>((t / kStages) & 1));
}

// Keeps the compiler from moving accumulator reads/writes across the async wgmma.
template <int NI>
__device__ __forceinline__ void pin_accumulators(float (&d)[1][NI][4]) {
#pragma unroll
  for (int i = 0; i < NI; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+f"(d[0][i][r])::"memory");
}

// The same for registers that feed a wgmma as its A operand (they must stay
// unchanged until the wgmma_wait that covers it).
template <int NK>
__device__ __forceinline__ void pin_fragments(uint32_t (&a)[NK][4]) {
#pragma unroll
  for (int i = 0; i < NK; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(a[i][r])::"memory");
}

// wgmma's fp32 accumulator operands d[0][i][0..3], i = 0 .. N/8 - 1 in register
// order, and the matching "%n" lists of the instruction's first operand.
#define DSK_ACC4(i) "+f"(d[0][i][0]), "+f"(d[0][i][1]), "+f"(d[0][i][2]), "+f"(d[0][i][3])
#define DSK_ACC16(i) DSK_ACC4(i), DSK_ACC4(i + 1), DSK_ACC4(i + 2), DSK_ACC4(i + 3)
#define DSK_ACC_N64 DSK_ACC16(0), DSK_ACC16(4)
#define DSK_ACC_N128 DSK_ACC_N64, DSK_ACC16(8), DSK_ACC16(12)
#define DSK_ACC_N256 DSK_ACC_N128, DSK_ACC16(16), DSK_ACC16(20), DSK_ACC16(24), DSK_ACC16(28)
#define DSK_REGS_N64 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define DSK_REGS_N128 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define DSK_REGS_N256 \
  DSK_REGS_N128 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

// D[64 x 256] += A[64 x 16] . B[256 x 16]^T, both from shared memory (K-major);
// PTX_TYPE is the 16-bit input type's name, "bf16" or "f16".
#define DSK_WGMMA_M64N256K16(PTX_TYPE)                                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                              \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX_TYPE "." PTX_TYPE " {" \
               DSK_REGS_N256 "}, %128, %129, p, 1, 1, 0, 0;\n}\n"                        \
               : DSK_ACC_N256                                                             \
               : "l"(desc_a), "l"(desc_b), "r"(1))

template <typename T>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[1][32][4], uint64_t desc_a, uint64_t desc_b);

template <>
__device__ __forceinline__ void wgmma_m64n256k16<__nv_bfloat16>(float (&d)[1][32][4], uint64_t desc_a,
                                                                uint64_t desc_b) {
  DSK_WGMMA_M64N256K16("bf16");
}

template <>
__device__ __forceinline__ void wgmma_m64n256k16<__half>(float (&d)[1][32][4], uint64_t desc_a,
                                                         uint64_t desc_b) {
  DSK_WGMMA_M64N256K16("f16");
}

// D[64 x 128] (+)= A[64 x 32] . B[128 x 32]^T in FP8 e4m3 (K-major, shared memory);
// scale_d = 0 overwrites D (the first K step of a scale block).
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[1][16][4], uint64_t desc_a,
                                                      uint64_t desc_b, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {" DSK_REGS_N128
               "}, %64, %65, p, 1, 1;\n}\n"
               : DSK_ACC_N128
               : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// S[64 x 128] (+)= A[64 x 16] . B[128 x 16]^T, both K-major in shared memory;
// scale_d = 0 overwrites S (the first K step).
#define DSK_WGMMA_M64N128K16_SS(PTX_TYPE)                                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " {" \
               DSK_REGS_N128 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                          \
               : DSK_ACC_N128                                                             \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d))

template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[1][16][4], uint64_t desc_a,
                                                    uint64_t desc_b, int scale_d);
template <>
__device__ __forceinline__ void wgmma_m64n128k16_ss<__nv_bfloat16>(float (&d)[1][16][4],
                                                                   uint64_t desc_a, uint64_t desc_b,
                                                                   int scale_d) {
  DSK_WGMMA_M64N128K16_SS("bf16");
}
template <>
__device__ __forceinline__ void wgmma_m64n128k16_ss<__half>(float (&d)[1][16][4], uint64_t desc_a,
                                                            uint64_t desc_b, int scale_d) {
  DSK_WGMMA_M64N128K16_SS("f16");
}

// S[64 x 64] (+)= A[64 x 16] . B[16 x 64], both in shared memory; TA / TB = 1
// reads that operand MN-major (M or N contiguous, wgmma_desc_mn; 16-bit types
// only), 0 K-major (wgmma_desc). scale_d = 0 overwrites S (the first K step).
#define DSK_WGMMA_M64N64K16_SS(PTX_TYPE, TA, TB)                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE " {"  \
               DSK_REGS_N64 "}, %32, %33, p, 1, 1, " #TA ", " #TB ";\n}\n"               \
               : DSK_ACC_N64                                                              \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d))

template <typename T, bool kTransA, bool kTransB>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[1][8][4], uint64_t desc_a,
                                                   uint64_t desc_b, int scale_d) {
  static_assert(kTransA == kTransB, "instantiated for both K-major or both MN-major");
  if constexpr (std::is_same_v<T, __half>) {
    if constexpr (kTransA) DSK_WGMMA_M64N64K16_SS("f16", 1, 1);
    else DSK_WGMMA_M64N64K16_SS("f16", 0, 0);
  } else {
    if constexpr (kTransA) DSK_WGMMA_M64N64K16_SS("bf16", 1, 1);
    else DSK_WGMMA_M64N64K16_SS("bf16", 0, 0);
  }
}

// O[64 x N] += A[64 x 16] . B[16 x N], A from registers (per warp, mma.sync
// m16n8k16's A fragment of its 16 rows: 4 registers of T pairs, the lower k in
// the low half), B MN-major in shared memory (imm-trans-b = 1).
#define DSK_WGMMA_M64N128K16_RS(PTX_TYPE)                                                \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                              \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " {" \
               DSK_REGS_N128 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"            \
               : DSK_ACC_N128                                                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define DSK_WGMMA_M64N64K16_RS(PTX_TYPE)                                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                              \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE " {"  \
               DSK_REGS_N64 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"             \
               : DSK_ACC_N64                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

template <typename T, int N>
__device__ __forceinline__ void wgmma_m64nNk16_rs(float (&d)[1][N / 8][4], const uint32_t (&a)[4],
                                                  uint64_t desc_b);
template <>
__device__ __forceinline__ void wgmma_m64nNk16_rs<__nv_bfloat16, 128>(float (&d)[1][16][4],
                                                                      const uint32_t (&a)[4],
                                                                      uint64_t desc_b) {
  DSK_WGMMA_M64N128K16_RS("bf16");
}
template <>
__device__ __forceinline__ void wgmma_m64nNk16_rs<__half, 128>(float (&d)[1][16][4],
                                                               const uint32_t (&a)[4], uint64_t desc_b) {
  DSK_WGMMA_M64N128K16_RS("f16");
}
template <>
__device__ __forceinline__ void wgmma_m64nNk16_rs<__nv_bfloat16, 64>(float (&d)[1][8][4],
                                                                     const uint32_t (&a)[4],
                                                                     uint64_t desc_b) {
  DSK_WGMMA_M64N64K16_RS("bf16");
}
template <>
__device__ __forceinline__ void wgmma_m64nNk16_rs<__half, 64>(float (&d)[1][8][4],
                                                              const uint32_t (&a)[4], uint64_t desc_b) {
  DSK_WGMMA_M64N64K16_RS("f16");
}

#undef DSK_WGMMA_M64N64K16_RS
#undef DSK_WGMMA_M64N64K16_SS
#undef DSK_WGMMA_M64N128K16_RS
#undef DSK_WGMMA_M64N128K16_SS
#undef DSK_WGMMA_M64N256K16
#undef DSK_REGS_N256
#undef DSK_REGS_N128
#undef DSK_REGS_N64
#undef DSK_ACC_N256
#undef DSK_ACC_N128
#undef DSK_ACC_N64
#undef DSK_ACC16
#undef DSK_ACC4

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Host side: whether `kernel` (a wgmma kernel taking `smem` bytes of dynamic
// shared memory) can run on the current device: the build holds sm_90a code
// (built_sm90a, from the build's architecture list), the device is compute
// capability 9.x and the kernel the driver picked is that code (PTX version 90).
// Asked once per device (< 64) and kernel (the cache, checked / usable, is the
// caller's); raises the kernel's shared-memory limit the first time. `err`
// reports a failing CUDA call (then the answer is true: launch nothing, return
// the error).
template <typename Kernel>
bool wgmma_usable(Kernel kernel, int smem, bool built_sm90a, std::atomic<uint64_t>& checked,
                  std::atomic<uint64_t>& usable, cudaError_t& err) {
  int device = 0;
  err = cudaGetDevice(&device);
  if (err != cudaSuccess) return true;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (checked.load(std::memory_order_acquire) & bit) != 0)
    return (usable.load(std::memory_order_relaxed) & bit) != 0;
  cudaFuncAttributes attr{};
  int major = 0, optin = 0;
  err = cudaFuncGetAttributes(&attr, kernel);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return true;
  const bool ok = built_sm90a && major == 9 && attr.ptxVersion == 90 && optin >= smem;
  if (ok) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return true;
    usable.fetch_or(bit, std::memory_order_relaxed);
  }
  checked.fetch_or(bit, std::memory_order_release);
  return ok;
}

}  // namespace dsk
