// SGMV shrink: v[t, :r_s] = x[t] @ A_s[layer].T for each segment s (shapes: sgmv.h).
//
// A CTA owns one tile of BM = 16 * WM rows of one segment and a slice of h_in; its 4 warps are
// WM along rows x WK = 4 / WM along h_in. Each warp streams 16-byte chunks of x and A rows and
// feeds them to m16n8k16 MMAs: since h_in is only summed over, the 8 elements of a chunk may fill
// the MMA's k slots in any order as long as x and A use the same one, so no shared memory or
// shuffles are needed. Partial sums are reduced across the WK warps in shared memory and, when
// few tiles exist (decode), across a cluster of CK CTAs that split h_in further (sm_90 DSMEM).
// blockIdx.z picks the projection: one launch serves every projection that reads the same x.
#pragma once

#include <cooperative_groups.h>

#include "sgmv.h"
#include "sgmv_common.cuh"

namespace lorafleet::sgmv {

template <typename T, int RMAX, int WM, bool kCluster>
__global__ void __launch_bounds__(kThreads) shrink_kernel(const ShrinkParams p) {
  constexpr int WK = 4 / WM;
  constexpr int BM = 16 * WM;
  constexpr int NT = RMAX / 8;  // n-tiles of 8 rank columns
  __shared__ float s_part[WK][BM][RMAX];
  __shared__ Tile s_tile;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t proj_base = static_cast<int64_t>(blockIdx.z) * p.num_segments;
  const int32_t* ranks = p.ranks + proj_base;
  if (warp == 0) {
    const Tile t = find_tile<BM>(p.seg_starts, ranks, p.num_segments, blockIdx.x);
    if (lane == 0) s_tile = t;
  }
  __syncthreads();
  const Tile tile = s_tile;
  if (tile.seg < 0) return;  // uniform over the cluster: its CTAs share blockIdx.x and .z

  const int seg_rank = ranks[tile.seg];
  const int rank = min(seg_rank, RMAX);
  const int row_end = p.seg_starts[tile.seg + 1];
  const int h_in = p.h_in;
  const T* a = reinterpret_cast<const T*>(p.a_ptrs[proj_base + tile.seg]) +
               static_cast<int64_t>(p.layer_idx) * seg_rank * h_in;

  const int wm = warp % WM, wk = warp / WM;
  const int g = lane / 4, c = lane % 4;
  const T* arow = a + static_cast<int64_t>(g) * h_in + c * 8;

  // h_in in steps of 32 (4 lanes x 8 elements), split contiguously over gridDim.y * WK warps.
  const int steps = (h_in + 31) / 32;
  const int splits = gridDim.y * WK;
  const int per = (steps + splits - 1) / splits;
  const int step0 = (blockIdx.y * WK + wk) * per;
  const int step1 = min(steps, step0 + per);

  // Loads of U steps are issued together: U * (NT + 2) 16-byte loads in flight per thread.
  constexpr int U = NT <= 2 ? 8 : (NT <= 4 ? 4 : (NT <= 8 ? 2 : 1));
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 a4[U][NT];
  const auto load_a = [&](int first) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = (first + u) * 32;
      const bool k_ok = first + u < step1 && k + c * 8 < h_in;  // h_in % 8 == 0
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const bool ok = k_ok && j * 8 + g < rank;
        a4[u][j] = ok ? ld_stream(arow + static_cast<int64_t>(j * 8) * h_in + k) : zero;
      }
    }
  };
  // The weights are not written by the previous kernel: start reading them before waiting, and
  // (decode tiles, whose A slice no other CTA reads) pull the rest of the slice into L2.
  load_a(step0);
  if constexpr (WM == 1) {
    for (int step = step0 + U; c == 0 && step < step1; ++step)
      for (int n = g; n < rank; n += 8)
        prefetch_l2(a + static_cast<int64_t>(n) * h_in + step * 32);
  }
  pdl_wait();
  pdl_launch_dependents();

  const T* x = static_cast<const T*>(p.x);
  const int row_a = tile.row0 + wm * 16 + g, row_b = row_a + 8;
  const bool has_a = row_a < row_end, has_b = row_b < row_end;
  const T* xa = x + static_cast<int64_t>(row_a) * p.ldx + c * 8;
  const T* xb = x + static_cast<int64_t>(row_b) * p.ldx + c * 8;

  float acc[NT][4] = {};
  for (int first = step0; first < step1; first += U) {
    if (first != step0) load_a(first);
    uint4 xa4[U], xb4[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = (first + u) * 32;
      const bool k_ok = first + u < step1 && k + c * 8 < h_in;
      xa4[u] = has_a && k_ok ? __ldg(reinterpret_cast<const uint4*>(xa + k)) : zero;
      xb4[u] = has_b && k_ok ? __ldg(reinterpret_cast<const uint4*>(xb + k)) : zero;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (j * 8 < rank) {
          mma16816<T>(acc[j], xa4[u].x, xb4[u].x, xa4[u].y, xb4[u].y, a4[u][j].x, a4[u][j].y);
          mma16816<T>(acc[j], xa4[u].z, xb4[u].z, xa4[u].w, xb4[u].w, a4[u][j].z, a4[u][j].w);
        }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < NT; ++j) {
    if (j * 8 < rank) {
      const int col = j * 8 + 2 * c;
      float* top = &s_part[wk][wm * 16 + g][col];
      float* bottom = &s_part[wk][wm * 16 + g + 8][col];
      top[0] = acc[j][0];
      top[1] = acc[j][1];
      bottom[0] = acc[j][2];
      bottom[1] = acc[j][3];
    }
  }
  __syncthreads();

  const int cols = min(rank, p.v_cols);
  const int count = BM * cols;
  if constexpr (WK > 1) {
    for (int e = threadIdx.x; e < count; e += kThreads) {
      const int r = e / cols, col = e % cols;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < WK; ++w) sum += s_part[w][r][col];
      s_part[0][r][col] = sum;
    }
  }

  T* v = static_cast<T*>(p.v) + static_cast<int64_t>(blockIdx.z) * p.v_cols;
  int first = threadIdx.x, stride = kThreads;
  if constexpr (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    first += blockIdx.y * kThreads;
    stride *= gridDim.y;
    for (int e = first; e < count; e += stride) {
      const int r = e / cols, col = e % cols;
      float sum = 0.f;
      for (int q = 0; q < static_cast<int>(gridDim.y); ++q)
        sum += cluster.map_shared_rank(&s_part[0][0][0], q)[r * RMAX + col];
      if (tile.row0 + r < row_end)
        v[static_cast<int64_t>(tile.row0 + r) * p.ldv + col] = from_float<T>(sum);
    }
    cluster.sync();  // keep this CTA's shared memory alive until every peer has read it
#else
    __trap();  // clusters are launched on sm_90 only
#endif
  } else {
    __syncthreads();
    for (int e = first; e < count; e += stride) {
      const int r = e / cols, col = e % cols;
      if (tile.row0 + r < row_end)
        v[static_cast<int64_t>(tile.row0 + r) * p.ldv + col] = from_float<T>(s_part[0][r][col]);
    }
  }
}


template <typename T, int RMAX, int WM>
cudaError_t launch_shrink(const ShrinkParams& p, int num_sms, int cc_major, cudaStream_t stream) {
  constexpr int WK = 4 / WM;
  const int tiles = max_tiles(p.num_rows, p.num_segments, 16 * WM) * p.num_proj;
  // Split h_in over a cluster while the grid stays within one wave of resident CTAs (at most 3
  // per SM), keeping >= 2 steps of 32 per warp. A second wave doubles a decode shrink's time
  // (v3: B=64 took 2x B=32), so the split stops short of it.
  int ck = 1;
  if (cc_major >= 9) {
    static const int per_sm = ctas_per_sm(shrink_kernel<T, RMAX, WM, true>);
    const int wave = num_sms * min(per_sm, 3);
    const int steps = (p.h_in + 31) / 32;
    while (ck < 8 && tiles * ck * 2 <= wave && steps >= 4 * ck * WK) ck *= 2;
  }
  const dim3 grid(tiles / p.num_proj, ck, p.num_proj);
  if (ck == 1) return launch(shrink_kernel<T, RMAX, WM, false>, grid, 0, 1, cc_major, p, stream);
  return launch(shrink_kernel<T, RMAX, WM, true>, grid, 0, ck, cc_major, p, stream);
}

}  // namespace lorafleet::sgmv

namespace lorafleet {

template <typename T, int RMAX>
cudaError_t sgmv_shrink(const ShrinkParams& p, cudaStream_t stream) {
  if (p.num_rows == 0 || p.num_segments == 0) return cudaSuccess;
  int num_sms = 0, cc_major = 0;
  const cudaError_t err = sgmv::device_info(&num_sms, &cc_major);
  if (err != cudaSuccess) return err;
  // Tiles of 64 rows reuse A over 4 warps; worth it only with enough tiles to fill the GPU.
  const int rows_per_segment = (p.num_rows + p.num_segments - 1) / p.num_segments;
  if (rows_per_segment > 16 && sgmv::max_tiles(p.num_rows, p.num_segments, 64) >= num_sms)
    return sgmv::launch_shrink<T, RMAX, 4>(p, num_sms, cc_major, stream);
  return sgmv::launch_shrink<T, RMAX, 1>(p, num_sms, cc_major, stream);
}

}  // namespace lorafleet
