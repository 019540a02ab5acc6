// Torch-free entry points of the paged KV kernels (instantiated in paged_attention.cu).
// Semantics and shapes: shard/ops/attention.py. Pointers are device pointers; strides are in
// elements. Caches are contiguous [pages, kPageSize, n_kv, d].
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace lorafleet {

constexpr int kPageSize = 16;     // tokens per KV page: the compiled fast path
constexpr int kMaxGroup = 8;      // query heads per kv head served by one warp's MMA tile
constexpr int kMaxSplits = 8;     // CTAs one (request, kv head) may split its context over

struct KvAppendParams {
  void* k_cache;              // [num_slots, row_bytes] bytes, contiguous
  void* v_cache;
  const void* k;              // [T] rows of row_bytes, 16-byte aligned
  const void* v;
  int64_t k_row_stride;       // bytes between rows of k (any multiple of 16)
  int64_t v_row_stride;
  const int64_t* slots;       // [T]; out of range: row skipped (a memory guard, never relied on)
  int64_t num_slots;          // pages * page_size
  int num_rows;
  int row_bytes;              // n_kv * d * element size, a multiple of 16
};

struct DecodeParams {
  void* out;                  // [B, n_q, d] written; rows may be strided
  int64_t out_row_stride;
  const void* q;              // [B, n_q, d]
  int64_t q_row_stride;
  const void* k_cache;        // [pages, kPageSize, n_kv, d]
  const void* v_cache;
  const int32_t* block_tables;  // [B, max_pages]
  int64_t block_table_stride;
  const int32_t* context_lens;  // [B]
  int batch;
  int num_q_heads;
  int num_kv_heads;
  int max_pages;
  int max_splits;             // 1..kMaxSplits; 1 turns split-K off
  float scale;
};

// Copies rows of bytes; dtype-agnostic.
cudaError_t kv_append(const KvAppendParams& p, cudaStream_t stream);

// T: __half or __nv_bfloat16; D: head dim (64 or 128). n_q / n_kv <= kMaxGroup.
template <typename T, int D>
cudaError_t paged_decode_attention(const DecodeParams& p, cudaStream_t stream);

}  // namespace lorafleet
