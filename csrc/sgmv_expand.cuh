// SGMV expand: y[t] += scale_s * (v[t, :r_s] @ B_s[layer]) for each segment s (shapes: sgmv.h).
//
// A CTA owns BM rows of one segment and BN columns of h_out. It copies B_s[:, cols] (k = rank
// rows, zero-padded to a multiple of 16) and the tile's v rows into shared memory with cp.async,
// then its 4 warps (WM x WN) run m16n8k16 MMAs fed by ldmatrix (.trans for B, which is k-major)
// and add the scaled fp32 result into y.
#pragma once

#include <atomic>

#include "sgmv.h"
#include "sgmv_common.cuh"

namespace lorafleet::sgmv {

template <int RMAX, int BM, int BN>
struct ExpandSmem {
  static constexpr int kStrideB = BN + 8;    // +16 bytes per row: conflict-free ldmatrix
  static constexpr int kStrideV = RMAX + 8;
  static constexpr int kBytes = (RMAX * kStrideB + BM * kStrideV) * 2;
};

template <typename T, int RMAX, int BM, int BN, int WM>
__global__ void __launch_bounds__(kThreads) expand_kernel(const ExpandParams p) {
  constexpr int WN = 4 / WM;
  constexpr int MT = BM / 16 / WM;  // m-tiles per warp
  constexpr int NW = BN / 8 / WN;   // n-tiles per warp
  static_assert(NW % 2 == 0, "ldmatrix.x4.trans loads two n-tiles");
  using Smem = ExpandSmem<RMAX, BM, BN>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sb = reinterpret_cast<T*>(smem);    // [RMAX][kStrideB]: B_s[k, col0 + n]
  T* sv = sb + RMAX * Smem::kStrideB;    // [BM][kStrideV]: v[row0 + m, k]
  __shared__ Tile s_tile;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    const Tile t = find_tile<BM>(p.seg_starts, p.ranks, p.num_segments, blockIdx.x);
    if (lane == 0) s_tile = t;
  }
  __syncthreads();
  const Tile tile = s_tile;
  if (tile.seg < 0) return;

  const int rank = min(min(p.ranks[tile.seg], RMAX), p.v_cols);
  const int kpad = (rank + 15) / 16 * 16;
  const int row_end = p.seg_starts[tile.seg + 1];
  const int h_out = p.h_out;
  const int col0 = blockIdx.y * BN;
  const T* b = reinterpret_cast<const T*>(p.b_ptrs[tile.seg]) +
               static_cast<int64_t>(p.layer_idx) * p.ranks[tile.seg] * h_out;
  const T* v = static_cast<const T*>(p.v);

  constexpr int kChunksB = BN / 8;
  for (int i = threadIdx.x; i < kpad * kChunksB; i += kThreads) {
    const int k = i / kChunksB, n = (i % kChunksB) * 8;
    const bool ok = k < rank && col0 + n < h_out;  // h_out % 8 == 0
    const T* src = ok ? b + static_cast<int64_t>(k) * h_out + col0 + n : b;
    cp_async16(sb + k * Smem::kStrideB + n, src, ok ? 16 : 0);
  }
  const int chunks_v = kpad / 8;
  for (int i = threadIdx.x; i < BM * chunks_v; i += kThreads) {
    const int m = i / chunks_v, k = (i % chunks_v) * 8;
    const int row = tile.row0 + m;
    // Columns past the rank are don't-care (maybe NaN): copy only the rank's bytes.
    const int bytes = row < row_end ? max(0, min(8, rank - k)) * 2 : 0;
    const T* src = bytes ? v + static_cast<int64_t>(row) * p.ldv + k : v;
    cp_async16(sv + m * Smem::kStrideV + k, src, bytes);
  }
  cp_async_wait_all();
  __syncthreads();

  const int wm = warp % WM, wn = warp / WM;
  float acc[MT][NW][4] = {};
  for (int k0 = 0; k0 < kpad; k0 += 16) {
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = (wm * MT + mt) * 16 + lane % 16;
      ldmatrix_x4(af[mt], sv + m * Smem::kStrideV + k0 + (lane / 16) * 8);
    }
#pragma unroll
    for (int np = 0; np < NW / 2; ++np) {
      uint32_t bf[4];
      const int k = k0 + lane % 8 + ((lane / 8) % 2) * 8;
      const int n = (wn * NW + np * 2) * 8 + (lane / 16) * 8;
      ldmatrix_x4_trans(bf, sb + k * Smem::kStrideB + n);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(acc[mt][2 * np], af[mt][0], af[mt][1], af[mt][2], af[mt][3], bf[0], bf[1]);
        mma16816<T>(acc[mt][2 * np + 1], af[mt][0], af[mt][1], af[mt][2], af[mt][3], bf[2],
                    bf[3]);
      }
    }
  }

  using T2 = typename Pair<T>::type;
  const float scale = p.scales[tile.seg];
  T* y = static_cast<T*>(p.y);
  const int g = lane / 4, c = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = tile.row0 + (wm * MT + mt) * 16 + g + half * 8;
      if (row >= row_end) continue;
      T* yrow = y + static_cast<int64_t>(row) * p.ldy;
#pragma unroll
      for (int nt = 0; nt < NW; ++nt) {
        const int col = col0 + (wn * NW + nt) * 8 + 2 * c;
        if (col < h_out) {
          T2* dst = reinterpret_cast<T2*>(yrow + col);
          float2 out = to_float2(*dst);
          out.x += scale * acc[mt][nt][half * 2];
          out.y += scale * acc[mt][nt][half * 2 + 1];
          *dst = from_float2<T>(out);
        }
      }
    }
  }
}

template <typename T, int RMAX, int BM, int BN, int WM>
cudaError_t launch_expand(const ExpandParams& p, cudaStream_t stream) {
  constexpr int kBytes = ExpandSmem<RMAX, BM, BN>::kBytes;
  auto* kernel = expand_kernel<T, RMAX, BM, BN, WM>;
  // Raise the shared-memory limit once per device, outside any graph capture (the first call).
  static std::atomic<uint64_t> raised{0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t{1} << (dev % 64);
  if (!(raised.load() & bit)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    if (err != cudaSuccess) return err;
    raised.fetch_or(bit);
  }
  const dim3 grid(max_tiles(p.num_rows, p.num_segments, BM), (p.h_out + BN - 1) / BN);
  kernel<<<grid, kThreads, kBytes, stream>>>(p);
  return cudaGetLastError();
}

// Rows per segment above which 64 x 128 tiles (B reused over 64 rows) beat 16 x 256 ones.
constexpr int kExpandPrefillRowsPerSegment = 16;

}  // namespace lorafleet::sgmv

namespace lorafleet {

template <typename T, int RMAX>
cudaError_t sgmv_expand(const ExpandParams& p, cudaStream_t stream) {
  if (p.num_rows == 0 || p.num_segments == 0) return cudaSuccess;
  if (p.num_rows > sgmv::kExpandPrefillRowsPerSegment * p.num_segments)
    return sgmv::launch_expand<T, RMAX, 64, 128, 2>(p, stream);
  return sgmv::launch_expand<T, RMAX, 16, 256, 1>(p, stream);
}

}  // namespace lorafleet
