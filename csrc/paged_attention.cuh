// KV append and decode attention over the paged KV cache (shapes: paged_attention.h).
//
// Decode attention is KV-read bound, so a CTA owns one (request, kv head, context split) and
// every one of its warps reads whole pages (16 tokens) with 16-byte loads that all query heads
// of the kv group share. Scores and the weighted sum of values are tensor-core MMAs
// (m16n8k16, fp32 accumulation) with the group's query heads padded to 8:
//   S[heads, 16 tokens]   = Q[heads, d] K^T        A = Q (rows 8..15 zero), B = K rows as loaded
//   O^T[d, heads]        += V^T[d, 16 tokens] P^T  A = V^T built by byte permutes, B = P
// d is only summed over in the first product, so each lane's 16-byte chunk of a K row may fill
// the MMA's k slots in any order as long as Q uses the same one (no shared memory, no shuffles).
// In the second product the lane of MMA row g holds d = 8g..8g+7 of four tokens; pairs of them
// are interleaved with prmt into the A fragment, and the accumulator's rows map back to d.
// Softmax is online (base 2, running max per head). Warps of a CTA and CTAs of a split cluster
// (sm_90 distributed shared memory) merge their (max, sum, acc) at the end.
#pragma once

#include <cooperative_groups.h>

#include "paged_attention.h"
#include "sgmv_common.cuh"

namespace lorafleet::attention {

using sgmv::from_float2;
using sgmv::ld_stream;
using sgmv::mma16816;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

__global__ void kv_append_kernel(const KvAppendParams p) {
  const int chunks = p.row_bytes / 16;
  const int64_t total = static_cast<int64_t>(p.num_rows) * chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / chunks, chunk = i % chunks;
    const int64_t slot = p.slots[row];
    if (slot < 0 || slot >= p.num_slots) continue;  // guards memory; graph padding has real slots
    const int64_t dst = slot * p.row_bytes + chunk * 16;
    const auto* k = static_cast<const char*>(p.k) + row * p.k_row_stride + chunk * 16;
    const auto* v = static_cast<const char*>(p.v) + row * p.v_row_stride + chunk * 16;
    *reinterpret_cast<uint4*>(static_cast<char*>(p.k_cache) + dst) =
        *reinterpret_cast<const uint4*>(k);
    *reinterpret_cast<uint4*>(static_cast<char*>(p.v_cache) + dst) =
        *reinterpret_cast<const uint4*>(v);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const auto h = from_float2<T>(make_float2(lo, hi));
  return reinterpret_cast<const uint32_t&>(h);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

// Running softmax state of a split: per head max (base-2 logits), sum and unnormalized output.
template <int D>
struct Partial {
  float m[kMaxGroup];
  float l[kMaxGroup];
  float acc[kMaxGroup][D];
};

// Merges the states at `parts[0..n)` for element (head, d); returns (max, sum, acc).
template <int D, typename Get>
__device__ __forceinline__ float3 merge(int n, int head, int d, Get get) {
  float m = -INFINITY;
  for (int i = 0; i < n; ++i) m = fmaxf(m, get(i)->m[head]);
  float l = 0.f, acc = 0.f;
  if (m != -INFINITY) {
    for (int i = 0; i < n; ++i) {
      const Partial<D>* s = get(i);
      const float w = exp2f(s->m[head] - m);  // an empty state (-inf) weighs 0
      l += w * s->l[head];
      acc += w * s->acc[head][d];
    }
  }
  return make_float3(m, l, acc);
}

// kUnroll: pages each warp has in flight per iteration.
template <typename T, int D, int kUnroll, bool kCluster>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  constexpr int kSpans = D / 32;  // QK: a lane's 16-byte chunk per 32 of d
  constexpr int kHalves = D / 64;  // PV: 8 lanes x 8 elements per 64 of d
  __shared__ Partial<D> s_warp[kWarps];
  __shared__ Partial<D> s_cta;

  const int split = blockIdx.x, splits = gridDim.x, kvh = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int ctx = max(p.context_lens[b], 0);
  const int pages = min((ctx + kPageSize - 1) / kPageSize, p.max_pages);
  const int per = (pages + splits - 1) / splits;
  const int page0 = split * per, page1 = min(pages, page0 + per);

  const uint4 zero = make_uint4(0, 0, 0, 0);
  // MMA row g is query head kvh * group + g; rows >= group are padding.
  uint4 qf[kSpans];
  {
    const T* q = static_cast<const T*>(p.q) + b * p.q_row_stride +
                 static_cast<int64_t>(kvh * group + g) * D + c * 8;
#pragma unroll
    for (int s = 0; s < kSpans; ++s)
      qf[s] = g < group ? *reinterpret_cast<const uint4*>(q + s * 32) : zero;
  }

  const int64_t tok_stride = static_cast<int64_t>(p.num_kv_heads) * D;
  const int64_t page_stride = kPageSize * tok_stride;
  const T* k_base = static_cast<const T*>(p.k_cache) + kvh * D + c * 8;
  const T* v_base = static_cast<const T*>(p.v_cache) + kvh * D + g * 8;
  const int32_t* table = p.block_tables + b * p.block_table_stride;
  // Tokens (within a page) whose values this lane loads: PV's k slots 2c, 2c+1, 2c+8, 2c+9.
  const int v_tok[4] = {2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9};
  const float qk_scale = p.scale * kLog2e;

  float m = -INFINITY;  // running max of head g (uniform over the 4 lanes c)
  float l = 0.f;        // this lane's share of head g's running sum
  float acc[kHalves][4][4] = {};
  constexpr int kStride = kWarps * kUnroll;

  // Page ids of this iteration and the next one.
  int phys[kUnroll], phys_next[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int page = page0 + warp * kUnroll + u;
    phys[u] = page < page1 ? table[page] : 0;
    phys_next[u] = page + kStride < page1 ? table[page + kStride] : 0;
  }
  for (int first = page0 + warp * kUnroll; first < page1; first += kStride) {
    uint4 kf[kUnroll][2][kSpans];
    uint4 vf[kUnroll][kHalves][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int page = first + u;
      const int tok0 = page * kPageSize;
      const T* kp = k_base + phys[u] * page_stride;
      const T* vp = v_base + phys[u] * page_stride;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bool ok = page < page1 && tok0 + i * 8 + g < ctx;
#pragma unroll
        for (int s = 0; s < kSpans; ++s)
          kf[u][i][s] = ok ? ld_stream(kp + (i * 8 + g) * tok_stride + s * 32) : zero;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // Values past the context are zeroed: garbage there could be NaN, and 0 * NaN is NaN.
        const bool ok = page < page1 && tok0 + v_tok[j] < ctx;
#pragma unroll
        for (int h = 0; h < kHalves; ++h)
          vf[u][h][j] = ok ? ld_stream(vp + v_tok[j] * tok_stride + h * 64) : zero;
      }
    }
    // While this iteration's loads are in flight: read the page ids after the next one. (An L2
    // prefetch of the next iteration's pages here cost 10-13% at large batches on an H200.)
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int page = first + kStride + u;
      phys[u] = phys_next[u];
      phys_next[u] = page + kStride < page1 ? table[page + kStride] : 0;
    }

    // Scores of head g at tokens 2c, 2c+1 (tile 0) and 8 + 2c, 9 + 2c (tile 1) of each page.
    float sc[kUnroll][4];
    float block_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int tok0 = (first + u) * kPageSize;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float s[4] = {};
#pragma unroll
        for (int sp = 0; sp < kSpans; ++sp) {
          mma16816<T>(s, qf[sp].x, 0u, qf[sp].y, 0u, kf[u][i][sp].x, kf[u][i][sp].y);
          mma16816<T>(s, qf[sp].z, 0u, qf[sp].w, 0u, kf[u][i][sp].z, kf[u][i][sp].w);
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const bool ok = first + u < page1 && tok0 + i * 8 + 2 * c + e < ctx;
          sc[u][i * 2 + e] = ok ? s[e] * qk_scale : -INFINITY;
          block_max = fmaxf(block_max, sc[u][i * 2 + e]);
        }
      }
    }
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 2));
    // Finite: the first token of page `first` is inside the context.
    const float m_new = fmaxf(m, block_max);
    const float alpha = exp2f(m - m_new);
    m = m_new;
    l *= alpha;
    // The accumulator's columns are heads 2c and 2c + 1, whose rows live in lanes 8c and 8c + 4.
    const float alpha0 = __shfl_sync(0xffffffffu, alpha, 8 * c);
    const float alpha1 = __shfl_sync(0xffffffffu, alpha, 8 * c + 4);
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[h][j][0] *= alpha0;
        acc[h][j][1] *= alpha1;
        acc[h][j][2] *= alpha0;
        acc[h][j][3] *= alpha1;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float pr[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pr[e] = exp2f(sc[u][e] - m_new);
        l += pr[e];
      }
      const uint32_t pb0 = pack2<T>(pr[0], pr[1]), pb1 = pack2<T>(pr[2], pr[3]);
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // Row g holds d = 64h + 8g + 2j, row g + 8 holds d + 1; low halves hold the first token.
          const uint32_t t0 = word(vf[u][h][0], j), t1 = word(vf[u][h][1], j);
          const uint32_t t8 = word(vf[u][h][2], j), t9 = word(vf[u][h][3], j);
          mma16816<T>(acc[h][j], __byte_perm(t0, t1, 0x5410), __byte_perm(t0, t1, 0x7632),
                      __byte_perm(t8, t9, 0x5410), __byte_perm(t8, t9, 0x7632), pb0, pb1);
        }
      }
    }
  }

  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  Partial<D>& mine = s_warp[warp];
  if (c == 0) {
    mine.m[g] = m;
    mine.l[g] = l;
  }
#pragma unroll
  for (int h = 0; h < kHalves; ++h) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int d = h * 64 + g * 8 + 2 * j;
      mine.acc[2 * c][d] = acc[h][j][0];
      mine.acc[2 * c + 1][d] = acc[h][j][1];
      mine.acc[2 * c][d + 1] = acc[h][j][2];
      mine.acc[2 * c + 1][d + 1] = acc[h][j][3];
    }
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out) + b * p.out_row_stride + static_cast<int64_t>(kvh * group) * D;
  const int count = group * D;
  const auto finish = [&](int e, float3 r) {
    // A request with no context (a padded row) gets zeros.
    out[e] = sgmv::from_float<T>(r.y > 0.f ? r.z / r.y : 0.f);
  };
  const auto warp_state = [&](int i) { return &s_warp[i]; };
  if constexpr (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (int e = threadIdx.x; e < count; e += kThreads) {
      const int head = e / D, d = e % D;
      const float3 r = merge<D>(kWarps, head, d, warp_state);
      if (d == 0) {
        s_cta.m[head] = r.x;
        s_cta.l[head] = r.y;
      }
      s_cta.acc[head][d] = r.z;
    }
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const auto cta_state = [&](int i) { return cluster.map_shared_rank(&s_cta, i); };
    for (int e = split * kThreads + threadIdx.x; e < count; e += kThreads * splits) {
      finish(e, merge<D>(splits, e / D, e % D, cta_state));
    }
    cluster.sync();  // keep this CTA's shared memory alive until every peer has read it
#else
    __trap();  // clusters are launched on sm_90 only
#endif
  } else {
    for (int e = threadIdx.x; e < count; e += kThreads)
      finish(e, merge<D>(kWarps, e / D, e % D, warp_state));
  }
}

template <typename T, int D, int kUnroll, bool kCluster>
cudaError_t launch_decode(const DecodeParams& p, int splits, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(splits, p.num_kv_heads, p.batch);
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = splits;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = kCluster ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, decode_kernel<T, D, kUnroll, kCluster>, p);
}

}  // namespace lorafleet::attention

namespace lorafleet {

template <typename T, int D>
cudaError_t paged_decode_attention(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  // Each warp reads two pages per iteration (one was 29% faster for the 7B shape at batch 1 on
  // an H200, but up to 20% slower from 256 CTAs on).
  constexpr int kUnroll = 2;
  int num_sms = 0, cc_major = 0;
  const cudaError_t err = sgmv::device_info(&num_sms, &cc_major);
  if (err != cudaSuccess) return err;
  // Split long contexts over a cluster until ~2 CTAs per SM, while every warp of a split keeps
  // at least one iteration's pages (block_tables' width bounds the longest context). Only grids
  // smaller than the GPU split: on an H200 splitting 256 CTAs cost 4-29%, while 8..64 CTAs
  // gained up to 5x at long contexts (64 CTAs at context 512 lost 30%).
  int splits = 1;
  if (cc_major >= 9 && p.batch * p.num_kv_heads < num_sms) {
    const int ctas = p.batch * p.num_kv_heads;
    const int pages_per_cta = attention::kWarps * kUnroll;
    while (splits * 2 <= p.max_splits && ctas * splits < 2 * num_sms &&
           p.max_pages >= 2 * splits * pages_per_cta)
      splits *= 2;
  }
  using attention::launch_decode;
  if (splits == 1) return launch_decode<T, D, kUnroll, false>(p, 1, stream);
  return launch_decode<T, D, kUnroll, true>(p, splits, stream);
}

}  // namespace lorafleet
