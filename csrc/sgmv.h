// Torch-free entry points of the SGMV kernels (instantiated in sgmv_shrink.cu / sgmv_expand.cu).
// Semantics and shapes: shard/ops/sgmv.py. Pointers are device pointers; strides are in elements.
//
// One launch serves P <= kMaxProjections projections of the same rows (q/k/v, gate/up): the
// weight tables are [P, S], projection p reads/writes columns p * v_cols .. of v, and the expand
// writes y columns y_cols[p] .. y_cols[p + 1].
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace lorafleet {

constexpr int kMaxProjections = 4;

struct ShrinkParams {
  void* v;                    // [T, P * v_cols] written
  int64_t ldv;
  int v_cols;                 // columns per projection
  const void* x;              // [T, h_in]
  int64_t ldx;
  const int64_t* a_ptrs;      // [P, S] -> A stack [L, r_ps, h_in]
  const int32_t* seg_starts;  // [S + 1]
  const int32_t* ranks;       // [P, S]
  int num_segments;
  int num_rows;
  int h_in;
  int layer_idx;
  int num_proj;               // P
};

struct ExpandParams {
  void* y;                    // [T, y_cols[P]] accumulated into
  int64_t ldy;
  const void* v;              // [T, P * v_cols]
  int64_t ldv;
  int v_cols;                 // columns per projection
  const int64_t* b_ptrs;      // [P, S] -> B stack [L, r_ps, y_cols[p + 1] - y_cols[p]]
  const int32_t* seg_starts;  // [S + 1]
  const int32_t* ranks;       // [P, S]
  const float* scales;        // [P, S]
  int num_segments;
  int num_rows;
  int layer_idx;
  int num_proj;                      // P
  int y_cols[kMaxProjections + 1];  // projection p owns y columns y_cols[p] .. y_cols[p + 1]
  int accumulate;                    // 1: y += the LoRA term; 0: y = it (0 in rank-0 segments)
};

// T: __half or __nv_bfloat16. RMAX: the largest rank any segment may have, one of the rank
// classes of shard/adapters/lora_ranks.py (tests/test_lora_ranks.py checks the instantiations).
template <typename T, int RMAX>
cudaError_t sgmv_shrink(const ShrinkParams& p, cudaStream_t stream);

template <typename T, int RMAX>
cudaError_t sgmv_expand(const ExpandParams& p, cudaStream_t stream);

}  // namespace lorafleet
