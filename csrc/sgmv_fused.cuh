// SGMV shrink + expand of one projection group in one launch (sm_90 thread-block clusters):
// y[t, cols_p] += scale_ps * (x[t] @ A_ps[layer].T) @ B_ps[layer] (shapes: sgmv.h).
//
// One cluster of CK CTAs owns a tile of up to 16 rows of one segment. CTA c of the cluster owns
// the c-th of CK contiguous ranges of h_in (shrink) and of the group's concatenated output
// columns (expand). Before waiting on the previous kernel (PDL) a CTA asks L2 to prefetch its
// whole A and B slices (weights are never written by that kernel) and starts copying its first
// pass of B into shared memory. Then it multiplies its x slice by A (MMAs fed straight from
// global, as in the shrink; warps split the CTA's h_in range and sum in shared memory); after a
// cluster barrier every CTA sums the cluster's partials through distributed shared memory into
// its own v tile, rounded to T as the two-launch path stores v. The expand then adds scale * v @ B into the CTA's columns, B staged in shared memory
// in passes of at most kPassCols columns, ldmatrix.trans + m16n8k16 MMAs.
//
// Two launches cost two dependent chains (and a grid-wide flush between them); one launch also
// lets the B loads start with the A loads. The dispatch in sgmv_fused() takes this kernel only
// when asked to (LORAFLEET_FUSED=1) and the batch fits; the two launches otherwise and on sm_80.
#pragma once

#include <cooperative_groups.h>

#include <atomic>
#include <cstdlib>

#include "sgmv.h"
#include "sgmv_common.cuh"

namespace lorafleet::sgmv {

constexpr int kFusedRows = 16;  // rows per tile: one m16 MMA tile

template <int RMAX>
struct FusedSmem {
  static constexpr int kPassCols = 16384 / RMAX;  // B columns staged per pass: 32 KiB
  static constexpr int kStrideB = kPassCols + 8;  // +16 bytes per row: conflict-free ldmatrix
  static constexpr int kVCols = kMaxProjections * RMAX;
  static constexpr int kStrideV = kVCols + 8;
  static constexpr int kB = RMAX * kStrideB * 2;                 // B pass [RMAX][kStrideB] T
  static constexpr int kY = kFusedRows * kStrideB * 2;           // y pass [16][kStrideB] T
  static constexpr int kV = kFusedRows * kStrideV * 2;           // v tile [16][kStrideV] T
  static constexpr int kPart = kFusedRows * kVCols * 4;          // float [16][kVCols]
  static constexpr int kBytes = kB + kY + kV + kPart;
};

// The projection that owns 8-column chunk `col` of the concatenated output.
__device__ __forceinline__ int proj_of(const ExpandParams& e, int col) {
  int q = 0;
#pragma unroll
  for (int i = 1; i < kMaxProjections; ++i) q += (i < e.num_proj && col >= e.y_cols[i]) ? 1 : 0;
  return q;
}

__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

template <typename T, int RMAX>
__global__ void __launch_bounds__(kThreads) fused_kernel(const FusedParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using Smem = FusedSmem<RMAX>;
  constexpr int NT = RMAX / 8;   // shrink n-tiles of 8 rank columns per projection
  constexpr int KT = RMAX / 16;  // expand k-steps of 16
  constexpr int PC = Smem::kPassCols / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sb = reinterpret_cast<T*>(smem);                        // [RMAX][kStrideB]
  T* sy = reinterpret_cast<T*>(smem + Smem::kB);             // [16][kStrideB]
  T* sv = reinterpret_cast<T*>(smem + Smem::kB + Smem::kY);  // [16][kStrideV]
  float* s_part = reinterpret_cast<float*>(smem + Smem::kB + Smem::kY + Smem::kV);  // [16][kVCols]
  __shared__ Tile s_tile;

  const ShrinkParams& sp = p.shrink;
  const ExpandParams& ep = p.expand;
  const int num_proj = sp.num_proj, num_seg = sp.num_segments;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    const Tile t = find_tile<kFusedRows>(sp.seg_starts, sp.ranks, num_seg, blockIdx.x, num_proj);
    if (lane == 0) s_tile = t;
  }
  for (int i = threadIdx.x; i < kFusedRows * Smem::kVCols; i += kThreads) s_part[i] = 0.f;
  __syncthreads();
  const Tile tile = s_tile;
  if (tile.seg < 0) return;  // uniform over the cluster: its CTAs share blockIdx.x

  // Per projection: clamped rank and this layer's A / B (registers: the loops are unrolled).
  const int64_t layer = sp.layer_idx;
  int rk[kMaxProjections];
  const T* a_q[kMaxProjections];
  const T* b_q[kMaxProjections];
  int kmax = 0;
#pragma unroll
  for (int q = 0; q < kMaxProjections; ++q) {
    const int64_t at = static_cast<int64_t>(q) * num_seg + tile.seg;
    const int r = q < num_proj ? sp.ranks[at] : 0;
    const int width = ep.y_cols[q + 1] - ep.y_cols[q];
    rk[q] = min(r, RMAX);
    a_q[q] = r > 0 ? reinterpret_cast<const T*>(sp.a_ptrs[at]) + layer * r * sp.h_in : nullptr;
    b_q[q] = r > 0 ? reinterpret_cast<const T*>(ep.b_ptrs[at]) + layer * r * width : nullptr;
    kmax = max(kmax, rk[q]);
  }
  const int kpad = (kmax + 15) / 16 * 16;
  const int row_end = sp.seg_starts[tile.seg + 1];
  const int rows = min(kFusedRows, row_end - tile.row0);
  const int ck = gridDim.y, cta = blockIdx.y;

  // This CTA's h_in range (steps of 32) and output chunks (8 columns each).
  const int h_in = sp.h_in;
  const int steps = (h_in + 31) / 32;
  const int cta_steps = (steps + ck - 1) / ck;
  const int s_lo = min(steps, cta * cta_steps), s_hi = min(steps, s_lo + cta_steps);
  const int k_lo = min(h_in, s_lo * 32), k_hi = min(h_in, s_hi * 32);
  const int chunks = ep.y_cols[num_proj] / 8;
  const int cta_chunks = (chunks + ck - 1) / ck;
  const int c_lo = min(chunks, cta * cta_chunks), c_hi = min(chunks, (cta + 1) * cta_chunks);

  // Prefetch the CTA's weights into L2: one bulk request per row of A and of B.
#pragma unroll
  for (int q = 0; q < kMaxProjections; ++q) {
    const int width = ep.y_cols[q + 1] - ep.y_cols[q];
    const int lo = max(c_lo * 8, ep.y_cols[q]), hi = min(c_hi * 8, ep.y_cols[q + 1]);
    for (int n = threadIdx.x; n < rk[q]; n += kThreads) {
      if (k_hi > k_lo)
        prefetch_l2_bulk(a_q[q] + static_cast<int64_t>(n) * h_in + k_lo, (k_hi - k_lo) * 2);
      if (hi > lo)
        prefetch_l2_bulk(b_q[q] + static_cast<int64_t>(n) * width + (lo - ep.y_cols[q]),
                         (hi - lo) * 2);
    }
  }
  // B rows k < rank of the chunk's projection, zeros up to kpad (v's columns there are 0 too).
  const auto copy_b = [&](int first, int count) {
    for (int i = threadIdx.x; i < kpad * count; i += kThreads) {
      const int k = i / count, ch = i % count;
      const int col = (first + ch) * 8;
      const int q = proj_of(ep, col);
      int r = 0;
      const T* src = nullptr;
#pragma unroll
      for (int qq = 0; qq < kMaxProjections; ++qq) {
        if (qq == q) {
          r = rk[qq];
          src = b_q[qq] + static_cast<int64_t>(k) * (ep.y_cols[qq + 1] - ep.y_cols[qq]) +
                (col - ep.y_cols[qq]);
        }
      }
      const bool ok = k < r;
      const void* from = ok ? static_cast<const void*>(src) : static_cast<const void*>(ep.b_ptrs);
      cp_async16(sb + k * Smem::kStrideB + ch * 8, from, ok ? 16 : 0);
    }
  };
  // The tile's y values of a pass, in flight while the shrink runs (written before this kernel).
  T* y = static_cast<T*>(ep.y);
  const auto copy_y = [&](int first, int count) {
    for (int i = threadIdx.x; i < rows * count; i += kThreads) {
      const int m = i / count, ch = i % count;
      cp_async16(sy + m * Smem::kStrideB + ch * 8,
                 y + static_cast<int64_t>(tile.row0 + m) * ep.ldy + (first + ch) * 8, 16);
    }
  };
  copy_b(c_lo, min(PC, c_hi - c_lo));
  pdl_wait();
  pdl_launch_dependents();
  copy_y(c_lo, min(PC, c_hi - c_lo));

  // Shrink: partial v over this warp's share of the CTA's h_in range.
  const int warp_steps = (cta_steps + 3) / 4;
  const int step0 = min(s_hi, s_lo + warp * warp_steps);
  const int step1 = min(s_hi, step0 + warp_steps);
  const int g = lane / 4, c = lane % 4;
  const bool has_a = g < rows, has_b = g + 8 < rows;
  const T* x = static_cast<const T*>(sp.x);
  const T* xa = x + static_cast<int64_t>(tile.row0 + g) * sp.ldx + c * 8;
  const T* xb = xa + 8 * sp.ldx;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  constexpr int U = 2;
  float acc[kMaxProjections][NT][4] = {};
  for (int first = step0; first < step1; first += U) {
    uint4 xa4[U], xb4[U];
    bool k_ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = (first + u) * 32 + c * 8;
      k_ok[u] = first + u < step1 && k < h_in;  // h_in % 8 == 0
      xa4[u] = has_a && k_ok[u] ? __ldg(reinterpret_cast<const uint4*>(xa + k - c * 8)) : zero;
      xb4[u] = has_b && k_ok[u] ? __ldg(reinterpret_cast<const uint4*>(xb + k - c * 8)) : zero;
    }
#pragma unroll
    for (int q = 0; q < kMaxProjections; ++q) {
      if (rk[q] == 0) continue;
      uint4 a4[U][NT];
      const T* arow = a_q[q] + static_cast<int64_t>(g) * h_in + c * 8;
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const bool ok = k_ok[u] && j * 8 + g < rk[q];
          a4[u][j] = ok ? ld_stream(arow + static_cast<int64_t>(j * 8) * h_in + (first + u) * 32)
                        : zero;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if (j * 8 < rk[q]) {
            mma16816<T>(acc[q][j], xa4[u].x, xb4[u].x, xa4[u].y, xb4[u].y, a4[u][j].x, a4[u][j].y);
            mma16816<T>(acc[q][j], xa4[u].z, xb4[u].z, xa4[u].w, xb4[u].w, a4[u][j].z, a4[u][j].w);
          }
        }
      }
    }
  }
  // Warps add their partials in a fixed order, and every CTA sums the cluster's partials in
  // rank order: the result does not depend on timing (graph replay equals eager, bit for bit).
  for (int w = 0; w < kThreads / 32; ++w) {
    if (warp == w) {
#pragma unroll
      for (int q = 0; q < kMaxProjections; ++q) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if (j * 8 < rk[q]) {
            float* top = s_part + g * Smem::kVCols + q * RMAX + j * 8 + 2 * c;
            float* bottom = top + 8 * Smem::kVCols;
            if (has_a) {
              top[0] += acc[q][j][0];
              top[1] += acc[q][j][1];
            }
            if (has_b) {
              bottom[0] += acc[q][j][2];
              bottom[1] += acc[q][j][3];
            }
          }
        }
      }
    }
    __syncthreads();
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster_arrive();
  cluster_wait();  // every partial of the cluster is written
  const int vcols = num_proj * RMAX;
  for (int i = threadIdx.x; i < kFusedRows * vcols; i += kThreads) {
    const int m = i / vcols, col = i % vcols;
    float sum = 0.f;
    if (m < rows) {
      float part[16];  // clusters have at most 16 CTAs; all loads in flight at once
#pragma unroll
      for (int q = 0; q < 16; ++q)
        part[q] = q < ck ? cluster.map_shared_rank(s_part, q)[m * Smem::kVCols + col] : 0.f;
#pragma unroll
      for (int q = 0; q < 16; ++q) sum += part[q];
    }
    sv[m * Smem::kStrideV + col] = from_float<T>(sum);
  }
  cluster_arrive();  // done reading the peers' partials; waited for before exiting
  __syncthreads();

  // Expand: v fragments of every projection (A operand), then the CTA's chunks in passes.
  uint32_t af[kMaxProjections][KT][4];
#pragma unroll
  for (int q = 0; q < kMaxProjections; ++q) {
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      if (q < num_proj && kt * 16 < kpad)
        ldmatrix_x4(af[q][kt], sv + (lane % 16) * Smem::kStrideV + q * RMAX + kt * 16 +
                                   (lane / 16) * 8);
    }
  }
  using T2 = typename Pair<T>::type;
  const int row_a = tile.row0 + g, row_b = row_a + 8;
  for (int first = c_lo; first < c_hi; first += PC) {
    const int count = min(PC, c_hi - first);
    if (first != c_lo) {
      __syncthreads();  // every warp is done with the previous pass
      copy_b(first, count);
      copy_y(first, count);
    }
    cp_async_wait_all();
    __syncthreads();
    for (int ch = warp; ch < count; ch += kThreads / 32) {
      const int col = (first + ch) * 8 + 2 * c;
      const int qc = proj_of(ep, col);  // uniform over the warp
      float out[4] = {};
      float scale = 0.f;
      bool busy = false;
#pragma unroll
      for (int q = 0; q < kMaxProjections; ++q) {
        if (q != qc || rk[q] == 0) continue;
        busy = true;
        scale = ep.scales[static_cast<int64_t>(q) * num_seg + tile.seg];
#pragma unroll
        for (int kt = 0; kt < KT; ++kt) {
          if (kt * 16 < kpad) {
            uint32_t bf[2];
            ldmatrix_x2_trans(bf, sb + (kt * 16 + lane % 16) * Smem::kStrideB + ch * 8);
            mma16816<T>(out, af[q][kt][0], af[q][kt][1], af[q][kt][2], af[q][kt][3], bf[0], bf[1]);
          }
        }
      }
      if (!busy) continue;  // the segment skips this projection: its columns stay untouched
      if (has_a) {
        float2 o = to_float2(*reinterpret_cast<const T2*>(sy + g * Smem::kStrideB + ch * 8 + 2 * c));
        o.x += scale * out[0];
        o.y += scale * out[1];
        *reinterpret_cast<T2*>(y + row_a * ep.ldy + col) = from_float2<T>(o);
      }
      if (has_b) {
        const T* old = sy + (g + 8) * Smem::kStrideB + ch * 8 + 2 * c;
        float2 o = to_float2(*reinterpret_cast<const T2*>(old));
        o.x += scale * out[2];
        o.y += scale * out[3];
        *reinterpret_cast<T2*>(y + row_b * ep.ldy + col) = from_float2<T>(o);
      }
    }
  }
  cluster_wait();  // peers may still be reading this CTA's partial
#else
  __trap();  // launched on sm_90 only
#endif
}

// Sets the kernel's shared-memory limit and allows clusters of 16 (non-portable), once per
// device, and returns how many clusters of 4, 8 and 16 CTAs can be resident at once (index
// log2(ck) - 2; 0 where that size cannot run).
template <typename T, int RMAX>
cudaError_t fused_capacity(int (&clusters)[3]) {
  auto* kernel = fused_kernel<T, RMAX>;
  constexpr int kBytes = FusedSmem<RMAX>::kBytes;
  static std::atomic<uint64_t> ready{0};
  static int cached[64][3];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t{1} << (dev % 64);
  if (!(ready.load() & bit)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
    for (int i = 0; i < 3; ++i) {
      const int ck = 4 << i;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(1, ck);
      cfg.blockDim = dim3(kThreads);
      cfg.dynamicSmemBytes = kBytes;
      cudaLaunchAttribute attr;
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = 1;
      attr.val.clusterDim.y = ck;
      attr.val.clusterDim.z = 1;
      cfg.attrs = &attr;
      cfg.numAttrs = 1;
      int n = 0;
      if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
        (void)cudaGetLastError();  // a size that cannot run is not a launch error
        n = 0;
      }
      cached[dev % 64][i] = n;
    }
    ready.fetch_or(bit);
  }
  for (int i = 0; i < 3; ++i) clusters[i] = cached[dev % 64][i];
  return cudaSuccess;
}

}  // namespace lorafleet::sgmv

namespace lorafleet {

template <typename T, int RMAX>
cudaError_t sgmv_fused(const FusedParams& p, cudaStream_t stream) {
  const ShrinkParams& s = p.shrink;
  if (s.num_rows == 0 || s.num_segments == 0) return cudaSuccess;
  int num_sms = 0, cc_major = 0;
  cudaError_t err = sgmv::device_info(&num_sms, &cc_major);
  if (err != cudaSuccess) return err;
  // One launch needs clusters (sm_90), a v tile that fits its shared memory (ranks <= 32) and
  // 16-byte aligned y rows (staged with cp.async). It is opt-in (LORAFLEET_FUSED=1): on the
  // H200 it measured slower than the two launches (benchmarks/results/sgmv_NOTES.md, v8).
  // The largest cluster whose grid stays resident in one wave wins: more CTAs share a tile's
  // bytes. Larger batches take the two launches, whose 64-row tiles reuse weights.
  static const bool on = std::getenv("LORAFLEET_FUSED") != nullptr;
  const ExpandParams& e = p.expand;
  const bool y_aligned = reinterpret_cast<uintptr_t>(e.y) % 16 == 0 && e.ldy % 8 == 0;
  if constexpr (RMAX <= 32) {
    if (cc_major >= 9 && on && y_aligned) {
      int clusters[3];
      err = sgmv::fused_capacity<T, RMAX>(clusters);
      if (err != cudaSuccess) return err;
      const int tiles = sgmv::max_tiles(s.num_rows, s.num_segments, sgmv::kFusedRows);
      for (int i = 2; i >= 0; --i) {
        if (tiles <= clusters[i]) {
          return sgmv::launch(sgmv::fused_kernel<T, RMAX>, dim3(tiles, 4 << i),
                              sgmv::FusedSmem<RMAX>::kBytes, 4 << i, cc_major, p, stream);
        }
      }
    }
  }
  err = sgmv_shrink<T, RMAX>(p.shrink, stream);
  if (err != cudaSuccess) return err;
  return sgmv_expand<T, RMAX>(p.expand, stream);
}

}  // namespace lorafleet
