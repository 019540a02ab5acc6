// Device helpers shared by the SGMV kernels: tensor-core MMA, ldmatrix, cp.async, tile lookup.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace lorafleet::sgmv {

constexpr int kThreads = 128;  // 4 warps per CTA

template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ typename Pair<T>::type from_float2(float2 v);
template <>
__device__ __forceinline__ __half2 from_float2<__half>(float2 v) { return __float22half2_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat162 from_float2<__nv_bfloat16>(float2 v) {
  return __float22bfloat162_rn(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// c += a @ b for one m16n8k16 tile: a = 4 regs (row-major 16x16), b = 2 regs (col-major 16x8).
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Copies src_bytes (0..16) of the 16 bytes at src into dst and zero-fills the rest.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// Read-only 16-byte load that does not keep the line in L1: weights are streamed once. Not
// volatile, so the compiler may hoist it above earlier MMAs and keep many loads in flight.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// Programmatic dependent launch (sm_90): the kernel is launched while the previous kernel on the
// stream still runs. Before pdl_wait() it may only read what that kernel does not write (weights
// and index tensors); pdl_wait() returns once it has finished and its writes are visible. Each
// kernel lets its successor start only after its own wait, so at most one predecessor overlaps.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Launches kernel<<<grid, kThreads, smem, stream>>>(p), with programmatic dependent launch on
// sm_90+ and a (1, cluster_y, 1) cluster when cluster_y > 1.
template <typename Params>
cudaError_t launch(void (*kernel)(Params), dim3 grid, int smem, int cluster_y, int cc_major,
                   const Params& p, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2];
  int n = 0;
  if (cc_major >= 9) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster_y > 1) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = 1;
    attrs[n].val.clusterDim.y = cluster_y;
    attrs[n].val.clusterDim.z = 1;
    ++n;
  }
  cfg.attrs = attrs;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

struct Tile {
  int seg;   // segment index, -1 when this CTA has no tile
  int row0;  // first row of the tile
};

// Tiles are numbered segment by segment, ceil(rows_s / BM) for each segment of non-zero rank
// (of every segment with `all_segments`: an overwriting expand writes zeros in rank-0 ones).
// One warp finds which segment and rows tile `tile` covers (warp-wide scan over 32 segments at a
// time) so no host-side sync is needed to size the grid.
template <int BM>
__device__ Tile find_tile(const int32_t* seg_starts, const int32_t* ranks, int num_segments,
                          int tile, bool all_segments = false) {
  const int lane = threadIdx.x & 31;
  int base = 0;
  for (int s0 = 0; s0 < num_segments; s0 += 32) {
    const int s = s0 + lane;
    int lo = 0, n = 0;
    if (s < num_segments && (all_segments || ranks[s] > 0)) {
      lo = seg_starts[s];
      n = (seg_starts[s + 1] - lo + BM - 1) / BM;
    }
    int inclusive = n;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, inclusive, off);
      if (lane >= off) inclusive += t;
    }
    const int total = __shfl_sync(0xffffffffu, inclusive, 31);
    if (tile < base + total) {
      const unsigned hit = __ballot_sync(0xffffffffu, base + inclusive > tile);
      const int l = __ffs(hit) - 1;
      const int before = __shfl_sync(0xffffffffu, inclusive - n, l);
      const int first = __shfl_sync(0xffffffffu, lo, l);
      return {s0 + l, first + (tile - base - before) * BM};
    }
    base += total;
  }
  return {-1, 0};
}

// Upper bound on the number of tiles: sum_s ceil(rows_s / BM) <= T / BM + S, and <= T.
inline int max_tiles(int num_rows, int num_segments, int bm) {
  const long long bound = (num_rows + bm - 1) / bm + static_cast<long long>(num_segments);
  return static_cast<int>(bound < num_rows ? bound : num_rows);
}

// LORAFLEET_SM80=1 makes a Hopper GPU take the sm_80 launch paths (no programmatic dependent
// launch, no clusters), so that those paths are tested where only Hopper GPUs are at hand.
inline cudaError_t device_info(int* num_sms, int* cc_major) {
  static const bool force_sm80 = std::getenv("LORAFLEET_SM80") != nullptr;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(num_sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(cc_major, cudaDevAttrComputeCapabilityMajor, dev);
  if (force_sm80 && *cc_major > 8) *cc_major = 8;
  return err;
}

// CTAs of `kernel` (kThreads threads, no dynamic shared memory) that fit on one SM.
template <typename Params>
int ctas_per_sm(void (*kernel)(Params)) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query is not a launch error: assume one CTA per SM
    n = 1;
  }
  return n > 0 ? n : 1;
}

}  // namespace lorafleet::sgmv
