// Torch glue for the lorafleet kernels: every argument check, the dtype x rank dispatch, and the
// one TORCH_LIBRARY registration. The kernels themselves are torch-free (*.cuh, *.cu).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "paged_attention.h"
#include "sgmv.h"

namespace lorafleet {
namespace {

// Integers enter check messages as strings: streaming an int64_t into a TORCH_CHECK message
// segfaulted inside std::ostream::_M_insert<long> on the H200 machine (cuda-gdb backtrace, a
// libstdc++ mismatch between the extension and the process), so a failed check crashed instead
// of raising.
std::string num(int64_t v) { return std::to_string(v); }

// A tensor's shape as "[a, b, c]", for the same reason.
std::string dims(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + num(t.size(i));
  return out + "]";
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ",
              t.device());
}

void check_index(const at::Tensor& t, const at::Tensor& like, const char* name,
                 at::ScalarType dtype, int64_t size) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == size, name, " must have ", num(size), " elements, got ",
              num(t.size(0)));
}

// Rows of [T, width] matrices: unit column stride, rows aligned for `align_elems`-wide accesses.
void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name,
                int64_t align_elems) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", num(t.dim()), "-D");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must be ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(1) == 1, name, " must have stride(1) == 1");
  const int64_t bytes = align_elems * t.element_size();
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) % align_elems == 0, name,
              " row stride must be a multiple of ", num(align_elems));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0, name,
              " must be aligned to ", num(bytes), " bytes");
}

// A per-projection table: [S] (one projection) or [P, S], contiguous. Returns P.
int64_t check_table(const at::Tensor& t, const at::Tensor& like, const char* name,
                    at::ScalarType dtype, int64_t num_segments) {
  check_cuda(t, like, name);
  TORCH_CHECK((t.dim() == 1 || t.dim() == 2) && t.is_contiguous(), name,
              " must be a contiguous [S] or [P, S] tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.size(-1) == num_segments, name, " must have ", num(num_segments),
              " segments (last dim), got ", num(t.size(-1)));
  const int64_t num_proj = t.dim() == 2 ? t.size(0) : 1;
  TORCH_CHECK(num_proj >= 1 && num_proj <= kMaxProjections, name, " must have 1..",
              num(kMaxProjections), " projections, got ", num(num_proj));
  return num_proj;
}

void check_same_shape(const at::Tensor& t, const at::Tensor& like, const char* name,
                      const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have the shape of ", like_name, " (",
              num(like.dim()), "-D, ", num(like.numel()), " elements), got ", num(t.dim()), "-D, ",
              num(t.numel()), " elements");
}

std::string no_kernel(at::ScalarType dtype, int64_t rank) {
  return "no kernel for dtype=" + std::string(c10::toString(dtype)) +
         ", rank=" + std::to_string(rank) + " (supported: float16, bfloat16; rank <= 128)";
}

template <typename T, int R>
struct ShrinkLaunch {
  static cudaError_t run(const ShrinkParams& p, cudaStream_t s) { return sgmv_shrink<T, R>(p, s); }
};

template <typename T, int R>
struct ExpandLaunch {
  static cudaError_t run(const ExpandParams& p, cudaStream_t s) { return sgmv_expand<T, R>(p, s); }
};

// Runs Launch<T, RMAX>::run for the kernel serving `dtype` and ranks <= r_max.
template <template <typename, int> class Launch, typename T, typename Params>
cudaError_t dispatch_rank(at::ScalarType dtype, int64_t r_max, const Params& p, cudaStream_t s) {
  if (r_max <= 16) return Launch<T, 16>::run(p, s);
  if (r_max <= 32) return Launch<T, 32>::run(p, s);
  if (r_max <= 64) return Launch<T, 64>::run(p, s);
  TORCH_CHECK(r_max <= 128, no_kernel(dtype, r_max));
  return Launch<T, 128>::run(p, s);
}

template <template <typename, int> class Launch, typename Params>
cudaError_t dispatch_dtype_rank(at::ScalarType dtype, int64_t r_max, const Params& p,
                                cudaStream_t s) {
  if (dtype == at::kHalf) return dispatch_rank<Launch, __half>(dtype, r_max, p, s);
  if (dtype == at::kBFloat16) return dispatch_rank<Launch, __nv_bfloat16>(dtype, r_max, p, s);
  TORCH_CHECK(false, no_kernel(dtype, r_max));
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " launch failed: ", cudaGetErrorString(err));
}

// ------------------------------------------------------------------------------------ SGMV

// Checks the shrink's arguments and returns its parameters.
ShrinkParams shrink_params(const at::Tensor& v, const at::Tensor& x, const at::Tensor& a_ptrs,
                           const at::Tensor& seg_starts, const at::Tensor& ranks,
                           int64_t layer_idx) {
  check_rows(x, x, "x", 8);
  check_rows(v, x, "v", 1);
  const int64_t num_rows = x.size(0), num_segments = a_ptrs.size(-1);
  TORCH_CHECK(v.size(0) == num_rows, "v must have ", num(num_rows), " rows, got ",
              num(v.size(0)));
  TORCH_CHECK(x.size(1) % 8 == 0, "h_in must be a multiple of 8, got ", num(x.size(1)));
  const int64_t num_proj = check_table(a_ptrs, x, "a_ptrs", at::kLong, num_segments);
  check_same_shape(ranks, a_ptrs, "ranks", "a_ptrs");
  check_table(ranks, x, "ranks", at::kInt, num_segments);
  check_index(seg_starts, x, "seg_starts", at::kInt, num_segments + 1);
  TORCH_CHECK(layer_idx >= 0, "layer_idx must be >= 0, got ", num(layer_idx));
  TORCH_CHECK(v.size(1) % num_proj == 0, "v's ", num(v.size(1)),
              " columns do not split into ", num(num_proj), " projections");
  return ShrinkParams{v.data_ptr(),
                      v.stride(0),
                      static_cast<int>(v.size(1) / num_proj),
                      x.data_ptr(),
                      x.stride(0),
                      a_ptrs.data_ptr<int64_t>(),
                      seg_starts.data_ptr<int32_t>(),
                      ranks.data_ptr<int32_t>(),
                      static_cast<int>(num_segments),
                      static_cast<int>(num_rows),
                      static_cast<int>(x.size(1)),
                      static_cast<int>(layer_idx),
                      static_cast<int>(num_proj)};
}

// Checks the expand's arguments and returns its parameters.
ExpandParams expand_params(const at::Tensor& y, const at::Tensor& v, const at::Tensor& b_ptrs,
                           const at::Tensor& seg_starts, const at::Tensor& ranks,
                           const at::Tensor& scales, int64_t layer_idx, at::IntArrayRef widths,
                           bool accumulate) {
  check_rows(v, v, "v", 1);
  check_rows(y, v, "y", 2);
  const int64_t num_rows = v.size(0), num_segments = b_ptrs.size(-1);
  TORCH_CHECK(y.size(0) == num_rows, "y must have ", num(num_rows), " rows, got ",
              num(y.size(0)));
  const int64_t num_proj = check_table(b_ptrs, v, "b_ptrs", at::kLong, num_segments);
  check_same_shape(ranks, b_ptrs, "ranks", "b_ptrs");
  check_same_shape(scales, b_ptrs, "scales", "b_ptrs");
  check_table(ranks, v, "ranks", at::kInt, num_segments);
  check_table(scales, v, "scales", at::kFloat, num_segments);
  check_index(seg_starts, v, "seg_starts", at::kInt, num_segments + 1);
  TORCH_CHECK(layer_idx >= 0, "layer_idx must be >= 0, got ", num(layer_idx));
  TORCH_CHECK(static_cast<int64_t>(widths.size()) == num_proj, "widths must have ",
              num(num_proj), " entries (one per projection), got ",
              num(static_cast<int64_t>(widths.size())));
  TORCH_CHECK(v.size(1) % num_proj == 0, "v's ", num(v.size(1)),
              " columns do not split into ", num(num_proj), " projections");

  ExpandParams p{};
  int64_t col = 0;
  for (int64_t q = 0; q < num_proj; ++q) {
    TORCH_CHECK(widths[q] > 0 && widths[q] % 8 == 0,
                "each h_out must be a positive multiple of 8, got ", num(widths[q]));
    p.y_cols[q] = static_cast<int>(col);
    col += widths[q];
  }
  for (int64_t q = num_proj; q <= kMaxProjections; ++q) p.y_cols[q] = static_cast<int>(col);
  TORCH_CHECK(col == y.size(1), "widths sum to ", num(col), " but y has ", num(y.size(1)),
              " columns");
  p.y = y.data_ptr();
  p.ldy = y.stride(0);
  p.v = v.data_ptr();
  p.ldv = v.stride(0);
  p.v_cols = static_cast<int>(v.size(1) / num_proj);
  p.b_ptrs = b_ptrs.data_ptr<int64_t>();
  p.seg_starts = seg_starts.data_ptr<int32_t>();
  p.ranks = ranks.data_ptr<int32_t>();
  p.scales = scales.data_ptr<float>();
  p.num_segments = static_cast<int>(num_segments);
  p.num_rows = static_cast<int>(num_rows);
  p.layer_idx = static_cast<int>(layer_idx);
  p.num_proj = static_cast<int>(num_proj);
  p.accumulate = accumulate ? 1 : 0;
  return p;
}

void shrink_op(at::Tensor v, const at::Tensor& x, const at::Tensor& a_ptrs,
               const at::Tensor& seg_starts, const at::Tensor& ranks, int64_t layer_idx) {
  const ShrinkParams p = shrink_params(v, x, a_ptrs, seg_starts, ranks, layer_idx);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(dispatch_dtype_rank<ShrinkLaunch>(x.scalar_type(), p.v_cols, p, stream),
               "sgmv_shrink");
}

void expand_op(at::Tensor y, const at::Tensor& v, const at::Tensor& b_ptrs,
               const at::Tensor& seg_starts, const at::Tensor& ranks, const at::Tensor& scales,
               int64_t layer_idx, at::IntArrayRef widths, bool accumulate) {
  const ExpandParams p =
      expand_params(y, v, b_ptrs, seg_starts, ranks, scales, layer_idx, widths, accumulate);
  const c10::cuda::CUDAGuard guard(v.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(dispatch_dtype_rank<ExpandLaunch>(v.scalar_type(), p.v_cols, p, stream),
               "sgmv_expand");
}

// ------------------------------------------------------------------------ paged attention

// [rows, n_kv or n_q, d] with each row's heads contiguous; any 16-byte aligned row stride.
void check_head_rows(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D [rows, heads, head_dim], got ", num(t.dim()), "-D");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must be ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(2) == 1 && (t.size(1) == 1 || t.stride(1) == t.size(2)), name,
              " must have each row's [heads, head_dim] contiguous (stride(2) == 1, stride(1) == "
              "head_dim); any row stride works, e.g. a column slice of a fused qkv output");
  const int64_t vec = 16 / t.element_size();
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) % vec == 0, name, " row stride must be a multiple of ",
              num(vec), " elements (16 bytes), got ", num(t.stride(0)));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must be aligned to 16 bytes");
}

void check_cache(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D [pages, page_size, n_kv, head_dim], got ",
              num(t.dim()), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must be ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must be aligned to 16 bytes");
}

// The k and v caches: both pass check_cache against `like`, and v_cache has k_cache's shape.
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& like) {
  check_cache(k_cache, like, "k_cache");
  check_cache(v_cache, like, "v_cache");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ",
              dims(k_cache), ", got ", dims(v_cache));
}

void kv_append_op(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& slots) {
  check_caches(k_cache, v_cache, k_cache);
  check_head_rows(k, k_cache, "k");
  check_head_rows(v, k_cache, "v");
  const int64_t num_rows = k.size(0);
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK(t->size(0) == num_rows && t->size(1) == k_cache.size(2) &&
                    t->size(2) == k_cache.size(3),
                "k and v must be [", num(num_rows), ", ", num(k_cache.size(2)), ", ",
                num(k_cache.size(3)), "] (the cache's n_kv, head_dim), got ", dims(*t));
  }
  const int64_t row_bytes = k.size(1) * k.size(2) * k.element_size();
  TORCH_CHECK(row_bytes % 16 == 0, "n_kv * head_dim * element size must be a multiple of 16 "
              "bytes, got ", num(row_bytes));
  check_index(slots, k_cache, "slots", at::kLong, num_rows);

  const c10::cuda::CUDAGuard guard(k.device());
  const KvAppendParams p{k_cache.data_ptr(),
                         v_cache.data_ptr(),
                         k.data_ptr(),
                         v.data_ptr(),
                         k.stride(0) * k.element_size(),
                         v.stride(0) * v.element_size(),
                         slots.data_ptr<int64_t>(),
                         k_cache.size(0) * k_cache.size(1),
                         static_cast<int>(num_rows),
                         static_cast<int>(row_bytes)};
  check_launch(kv_append(p, c10::cuda::getCurrentCUDAStream()), "kv_append");
}

std::string no_attention_kernel(at::ScalarType dtype, int64_t head_dim, int64_t page_size,
                                int64_t group) {
  return "no kernel for dtype=" + std::string(c10::toString(dtype)) +
         ", head_dim=" + std::to_string(head_dim) + ", page_size=" + std::to_string(page_size) +
         ", n_q/n_kv=" + std::to_string(group) + " (supported: float16, bfloat16; head_dim 64, "
         "128; page_size " + std::to_string(kPageSize) + "; n_q/n_kv <= " +
         std::to_string(kMaxGroup) + ")";
}

template <typename T>
cudaError_t dispatch_head_dim(int64_t head_dim, const DecodeParams& p, cudaStream_t s) {
  if (head_dim == 64) return paged_decode_attention<T, 64>(p, s);
  return paged_decode_attention<T, 128>(p, s);
}

void paged_decode_attention_op(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_tables,
                               const at::Tensor& context_lens, double scale,
                               int64_t max_splits) {
  check_head_rows(q, q, "q");
  check_head_rows(out, q, "out");
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape ", dims(q), ", got ",
              dims(out));
  check_caches(k_cache, v_cache, q);
  const int64_t batch = q.size(0), n_q = q.size(1), head_dim = q.size(2);
  const int64_t page_size = k_cache.size(1), n_kv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "k_cache head_dim ", num(k_cache.size(3)),
              " must equal q's ", num(head_dim));
  TORCH_CHECK(n_kv > 0 && n_q % n_kv == 0, "n_q (", num(n_q), ") must be a multiple of n_kv (",
              num(n_kv), ")");
  const int64_t group = n_q / n_kv;
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kHalf || dtype == at::kBFloat16) && (head_dim == 64 ||
              head_dim == 128) && page_size == kPageSize && group <= kMaxGroup,
              no_attention_kernel(dtype, head_dim, page_size, group));
  check_cuda(block_tables, q, "block_tables");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch &&
                  block_tables.stride(1) == 1 && block_tables.scalar_type() == at::kInt,
              "block_tables must be int32 [", num(batch), ", max_pages] with stride(1) == 1, got ",
              block_tables.scalar_type(), " ", dims(block_tables));
  check_index(context_lens, q, "context_lens", at::kInt, batch);
  TORCH_CHECK(max_splits >= 1 && max_splits <= kMaxSplits, "max_splits must be in [1, ",
              num(kMaxSplits), "], got ", num(max_splits));

  const c10::cuda::CUDAGuard guard(q.device());
  const DecodeParams p{out.data_ptr(),
                       out.stride(0),
                       q.data_ptr(),
                       q.stride(0),
                       k_cache.data_ptr(),
                       v_cache.data_ptr(),
                       block_tables.data_ptr<int32_t>(),
                       block_tables.stride(0),
                       context_lens.data_ptr<int32_t>(),
                       static_cast<int>(batch),
                       static_cast<int>(n_q),
                       static_cast<int>(n_kv),
                       static_cast<int>(block_tables.size(1)),
                       static_cast<int>(max_splits),
                       static_cast<float>(scale)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = dtype == at::kHalf
                              ? dispatch_head_dim<__half>(head_dim, p, stream)
                              : dispatch_head_dim<__nv_bfloat16>(head_dim, p, stream);
  check_launch(err, "paged_decode_attention");
}

// --------------------------------------------------------------------- end paged attention

}  // namespace

TORCH_LIBRARY(lorafleet, m) {
  m.def(
      "sgmv_shrink(Tensor(a!) v, Tensor x, Tensor a_ptrs, Tensor seg_starts, Tensor ranks, "
      "int layer_idx) -> ()");
  m.def(
      "sgmv_expand(Tensor(a!) y, Tensor v, Tensor b_ptrs, Tensor seg_starts, Tensor ranks, "
      "Tensor scales, int layer_idx, int[] widths, bool accumulate=True) -> ()");
  // paged attention
  m.def(
      "kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor context_lens, float scale, int max_splits=8) -> ()");
}

TORCH_LIBRARY_IMPL(lorafleet, CUDA, m) {
  m.impl("sgmv_shrink", &shrink_op);
  m.impl("sgmv_expand", &expand_op);
  // paged attention
  m.impl("kv_append", &kv_append_op);
  m.impl("paged_decode_attention", &paged_decode_attention_op);
}

}  // namespace lorafleet
