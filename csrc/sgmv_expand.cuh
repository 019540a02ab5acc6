// SGMV expand: y[t] += scale_s * (v[t, :r_s] @ B_s[layer]) for each segment s (shapes: sgmv.h).
//
// A CTA owns BM rows of one segment and BN columns of h_out. It starts copying B_s[:, cols]
// (k = rank rows, zero-padded to a multiple of 16) into shared memory with cp.async before the
// previous kernel has finished (programmatic dependent launch), then loads the tile's v rows and
// its y values; its 4 warps (WM x WN) run m16n8k16 MMAs fed by ldmatrix (.trans for B, which is
// k-major) and write y + scale * acc. Column chunks are numbered projection by projection
// (blockIdx.y), so one launch serves every projection whose output columns share y.
#pragma once

#include <atomic>

#include "sgmv.h"
#include "sgmv_common.cuh"

namespace lorafleet::sgmv {

// The projection and columns that one CTA's chunk of blockIdx.y covers.
struct Chunk {
  int proj;   // -1: no chunk (never, for a grid sized by num_chunks)
  int col0;   // first column within the projection
  int h_out;  // the projection's width
  int y_col;  // the projection's first column in y
};

template <int BN>
__device__ __forceinline__ Chunk find_chunk(const ExpandParams& p, int chunk) {
  Chunk found{-1, 0, 0, 0};
#pragma unroll
  for (int q = 0; q < kMaxProjections; ++q) {
    const int width = p.y_cols[q + 1] - p.y_cols[q];
    const int n = q < p.num_proj ? (width + BN - 1) / BN : 0;
    if (found.proj < 0 && chunk >= 0 && chunk < n) found = {q, chunk * BN, width, p.y_cols[q]};
    chunk -= n;
  }
  return found;
}

inline int num_chunks(const ExpandParams& p, int bn) {
  int n = 0;
  for (int q = 0; q < p.num_proj; ++q) n += (p.y_cols[q + 1] - p.y_cols[q] + bn - 1) / bn;
  return n;
}

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

  const Chunk chunk = find_chunk<BN>(p, blockIdx.y);
  if (chunk.proj < 0) return;
  const int64_t proj_base = static_cast<int64_t>(chunk.proj) * p.num_segments;
  const int32_t* ranks = p.ranks + proj_base;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    const Tile t = find_tile<BM>(p.seg_starts, ranks, p.num_segments, blockIdx.x, !p.accumulate);
    if (lane == 0) s_tile = t;
  }
  __syncthreads();
  const Tile tile = s_tile;
  if (tile.seg < 0) return;

  const int rank = min(min(ranks[tile.seg], RMAX), p.v_cols);
  const int kpad = (rank + 15) / 16 * 16;
  const int row_end = p.seg_starts[tile.seg + 1];
  const int h_out = chunk.h_out;
  const int col0 = chunk.col0;
  const T* b = reinterpret_cast<const T*>(p.b_ptrs[proj_base + tile.seg]) +
               static_cast<int64_t>(p.layer_idx) * ranks[tile.seg] * h_out;

  // B is not written by the previous kernel: start copying it before waiting for that kernel.
  constexpr int kChunksB = BN / 8;
  for (int i = threadIdx.x; i < kpad * kChunksB; i += kThreads) {
    const int k = i / kChunksB, n = (i % kChunksB) * 8;
    const bool ok = k < rank && col0 + n < h_out;  // h_out % 8 == 0
    const T* src = ok ? b + static_cast<int64_t>(k) * h_out + col0 + n : b;
    cp_async16(sb + k * Smem::kStrideB + n, src, ok ? 16 : 0);
  }
  pdl_wait();
  pdl_launch_dependents();

  // v rows are few and short: plain loads, zero past the rank (those columns are don't-care).
  const T* v = static_cast<const T*>(p.v) + static_cast<int64_t>(chunk.proj) * p.v_cols;
  for (int i = threadIdx.x; i < BM * kpad; i += kThreads) {
    const int m = i / kpad, k = i % kpad;
    const int row = tile.row0 + m;
    const bool ok = row < row_end && k < rank;
    sv[m * Smem::kStrideV + k] = ok ? v[static_cast<int64_t>(row) * p.ldv + k] : from_float<T>(0.f);
  }

  // Read this thread's y pairs now so their latency overlaps the copy of B.
  using T2 = typename Pair<T>::type;
  T* y = static_cast<T*>(p.y) + chunk.y_col;
  const int g = lane / 4, c = lane % 4;
  const int wm = warp % WM, wn = warp / WM;
  T2 y_old[MT][2][NW];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = tile.row0 + (wm * MT + mt) * 16 + g + half * 8;
#pragma unroll
      for (int nt = 0; nt < NW; ++nt) {
        const int col = col0 + (wn * NW + nt) * 8 + 2 * c;
        if (p.accumulate && row < row_end && col < h_out)
          y_old[mt][half][nt] = *reinterpret_cast<const T2*>(y + static_cast<int64_t>(row) * p.ldy + col);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();

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

  const float scale = rank > 0 ? p.scales[proj_base + tile.seg] : 0.f;
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
          float2 out = p.accumulate ? to_float2(y_old[mt][half][nt]) : make_float2(0.f, 0.f);
          out.x += scale * acc[mt][nt][half * 2];
          out.y += scale * acc[mt][nt][half * 2 + 1];
          *reinterpret_cast<T2*>(yrow + col) = from_float2<T>(out);
        }
      }
    }
  }
}

template <typename T, int RMAX, int BM, int BN, int WM>
cudaError_t launch_expand(const ExpandParams& p, int cc_major, cudaStream_t stream) {
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
  const dim3 grid(max_tiles(p.num_rows, p.num_segments, BM), num_chunks(p, BN));
  return launch(kernel, grid, kBytes, 1, cc_major, p, stream);
}

// Decode-shaped expand (a few rows per segment): CUDA cores, no shared-memory staging of B.
// Each thread owns 8 adjacent columns and keeps 16 rows of B for them in flight at once (issued
// before waiting on the previous kernel); v rows are broadcast from shared memory.
constexpr int kRowsCols = kThreads * 8;  // columns per CTA

// RT rows per tile: 1 when segments have one row each (fewer registers, so more CTAs resident:
// a distinct decode batch of 64 has 704 CTAs at 4096 -> 11008), else 4.
template <typename T, int RMAX, int RT>
__global__ void __launch_bounds__(kThreads) expand_rows_kernel(const ExpandParams p) {
  constexpr int KG = 16;  // B rows loaded per group
  __shared__ float s_v[RT][RMAX];
  __shared__ Tile s_tile;

  const Chunk chunk = find_chunk<kRowsCols>(p, blockIdx.y);
  if (chunk.proj < 0) return;
  const int64_t proj_base = static_cast<int64_t>(chunk.proj) * p.num_segments;
  const int32_t* ranks = p.ranks + proj_base;
  if (threadIdx.x < 32) {
    const Tile t = find_tile<RT>(p.seg_starts, ranks, p.num_segments, blockIdx.x, !p.accumulate);
    if (threadIdx.x == 0) s_tile = t;
  }
  __syncthreads();
  const Tile tile = s_tile;
  if (tile.seg < 0) return;

  const int seg_rank = ranks[tile.seg];
  const int rank = min(min(seg_rank, RMAX), p.v_cols);
  const int row_end = p.seg_starts[tile.seg + 1];
  const int h_out = chunk.h_out;
  const int col = chunk.col0 + threadIdx.x * 8;
  const bool active = col < h_out;  // h_out % 8 == 0
  const T* bcol = reinterpret_cast<const T*>(p.b_ptrs[proj_base + tile.seg]) +
                  static_cast<int64_t>(p.layer_idx) * seg_rank * h_out + col;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 bk[KG];
  const auto load_b = [&](int k0) {
#pragma unroll
    for (int kk = 0; kk < KG; ++kk) {
      const bool ok = active && k0 + kk < rank;
      bk[kk] = ok ? ld_stream(bcol + static_cast<int64_t>(k0 + kk) * h_out) : zero;
    }
  };
  load_b(0);  // B is not written by the previous kernel
  pdl_wait();
  pdl_launch_dependents();

  const T* v = static_cast<const T*>(p.v) + static_cast<int64_t>(chunk.proj) * p.v_cols;
  for (int i = threadIdx.x; i < RT * rank; i += kThreads) {
    const int m = i / rank, k = i % rank;
    const int row = tile.row0 + m;
    s_v[m][k] = row < row_end ? to_float(v[static_cast<int64_t>(row) * p.ldv + k]) : 0.f;
  }
  using T2 = typename Pair<T>::type;
  T* y = static_cast<T*>(p.y) + chunk.y_col;
  const int rows = min(RT, row_end - tile.row0);
  T2 y_old[RT][4];
#pragma unroll
  for (int m = 0; m < RT; ++m) {
    if (p.accumulate && m < rows && active) {
      const T* yrow = y + static_cast<int64_t>(tile.row0 + m) * p.ldy;
      const T2* src = reinterpret_cast<const T2*>(yrow + col);
#pragma unroll
      for (int q = 0; q < 4; ++q) y_old[m][q] = src[q];
    }
  }
  __syncthreads();

  float acc[RT][8] = {};
  for (int k0 = 0; k0 < rank; k0 += KG) {
    if (k0 > 0) load_b(k0);
#pragma unroll
    for (int kk = 0; kk < KG; ++kk) {
      if (k0 + kk < rank) {
        const uint32_t w[4] = {bk[kk].x, bk[kk].y, bk[kk].z, bk[kk].w};
        float bf[8];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 f = to_float2(*reinterpret_cast<const T2*>(&w[q]));
          bf[2 * q] = f.x;
          bf[2 * q + 1] = f.y;
        }
#pragma unroll
        for (int m = 0; m < RT; ++m) {
          const float vm = s_v[m][k0 + kk];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m][e] += vm * bf[e];
        }
      }
    }
  }

  if (!active) return;
  const float scale = rank > 0 ? p.scales[proj_base + tile.seg] : 0.f;
#pragma unroll
  for (int m = 0; m < RT; ++m) {
    if (m < rows) {
      T2* dst = reinterpret_cast<T2*>(y + static_cast<int64_t>(tile.row0 + m) * p.ldy + col);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float2 out = p.accumulate ? to_float2(y_old[m][q]) : make_float2(0.f, 0.f);
        out.x += scale * acc[m][2 * q];
        out.y += scale * acc[m][2 * q + 1];
        dst[q] = from_float2<T>(out);
      }
    }
  }
}

}  // namespace lorafleet::sgmv

namespace lorafleet {

template <typename T, int RMAX>
cudaError_t sgmv_expand(const ExpandParams& p, cudaStream_t stream) {
  if (p.num_rows == 0 || p.num_segments == 0) return cudaSuccess;
  int num_sms = 0, cc_major = 0;
  const cudaError_t err = sgmv::device_info(&num_sms, &cc_major);
  if (err != cudaSuccess) return err;
  const int rows_per_segment = (p.num_rows + p.num_segments - 1) / p.num_segments;
  // CUDA cores for decode-shaped work with small ranks: about one row per adapter, or up to 64
  // rows per segment in batches of up to 256 rows. There (H100, bench_sgmv with both paths in
  // one call, see benchmarks/NOTES.md) it beat the 16 x 256 MMA tiles: B=64 Identical 5.1 -> 3.6 us,
  // Skewed 7.9 -> 4.6 us, the 256-row prefill 12.7 -> 11.0 us; at 1024 rows it lost (35.8 ->
  // 39.8 us). Larger ranks would load B in several sequential groups per thread: MMA path.
  const bool rows_shaped =
      rows_per_segment <= 2 || (rows_per_segment <= 64 && p.num_rows <= 256);
  if (rows_shaped && RMAX <= 32) {
    const int chunks = sgmv::num_chunks(p, sgmv::kRowsCols);
    if (rows_per_segment == 1) {
      const dim3 grid(sgmv::max_tiles(p.num_rows, p.num_segments, 1), chunks);
      return sgmv::launch(sgmv::expand_rows_kernel<T, RMAX, 1>, grid, 0, 1, cc_major, p, stream);
    }
    const dim3 grid(sgmv::max_tiles(p.num_rows, p.num_segments, 4), chunks);
    return sgmv::launch(sgmv::expand_rows_kernel<T, RMAX, 4>, grid, 0, 1, cc_major, p, stream);
  }
  // 64 x 128 tiles reuse B over 64 rows; worth it only with enough tiles to fill the GPU.
  if (rows_per_segment > 16 && sgmv::max_tiles(p.num_rows, p.num_segments, 64) >= num_sms)
    return sgmv::launch_expand<T, RMAX, 64, 128, 2>(p, cc_major, stream);
  return sgmv::launch_expand<T, RMAX, 16, 256, 1>(p, cc_major, stream);
}

}  // namespace lorafleet
