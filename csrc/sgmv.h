// Torch-free entry points of the SGMV kernels (instantiated in sgmv_shrink.cu / sgmv_expand.cu).
// Semantics and shapes: shard/ops/sgmv.py. Pointers are device pointers; strides are in elements.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace lorafleet {

struct ShrinkParams {
  void* v;                    // [T, v_cols] written
  int64_t ldv;
  int v_cols;
  const void* x;              // [T, h_in]
  int64_t ldx;
  const int64_t* a_ptrs;      // [S] -> A stack [L, r_s, h_in]
  const int32_t* seg_starts;  // [S + 1]
  const int32_t* ranks;       // [S]
  int num_segments;
  int num_rows;
  int h_in;
  int layer_idx;
};

struct ExpandParams {
  void* y;                    // [T, h_out] accumulated into
  int64_t ldy;
  const void* v;              // [T, v_cols]
  int64_t ldv;
  int v_cols;
  const int64_t* b_ptrs;      // [S] -> B stack [L, r_s, h_out]
  const int32_t* seg_starts;  // [S + 1]
  const int32_t* ranks;       // [S]
  const float* scales;        // [S]
  int num_segments;
  int num_rows;
  int h_out;
  int layer_idx;
};

// T: __half or __nv_bfloat16. RMAX: the largest rank any segment may have (16, 32, 64 or 128).
template <typename T, int RMAX>
cudaError_t sgmv_shrink(const ShrinkParams& p, cudaStream_t stream);

template <typename T, int RMAX>
cudaError_t sgmv_expand(const ExpandParams& p, cudaStream_t stream);

}  // namespace lorafleet
