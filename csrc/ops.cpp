// Torch glue for the lorafleet kernels: every argument check, the dtype x rank dispatch, and the
// one TORCH_LIBRARY registration. The kernels themselves are torch-free (*.cuh, *.cu).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "sgmv.h"

namespace lorafleet {
namespace {

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
  TORCH_CHECK(t.size(0) == size, name, " must have ", size, " elements, got ", t.size(0));
}

// Rows of [T, width] matrices: unit column stride, rows aligned for `align_elems`-wide accesses.
void check_rows(const at::Tensor& t, const at::Tensor& like, const char* name,
                int64_t align_elems) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must be ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(1) == 1, name, " must have stride(1) == 1");
  const int64_t bytes = align_elems * t.element_size();
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) % align_elems == 0, name,
              " row stride must be a multiple of ", align_elems);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0, name,
              " must be aligned to ", bytes, " bytes");
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

void shrink_op(at::Tensor v, const at::Tensor& x, const at::Tensor& a_ptrs,
               const at::Tensor& seg_starts, const at::Tensor& ranks, int64_t layer_idx) {
  check_rows(x, x, "x", 8);
  check_rows(v, x, "v", 1);
  const int64_t num_rows = x.size(0), num_segments = a_ptrs.size(0);
  TORCH_CHECK(v.size(0) == num_rows, "v must have ", num_rows, " rows, got ", v.size(0));
  TORCH_CHECK(x.size(1) % 8 == 0, "h_in must be a multiple of 8, got ", x.size(1));
  check_index(a_ptrs, x, "a_ptrs", at::kLong, num_segments);
  check_index(seg_starts, x, "seg_starts", at::kInt, num_segments + 1);
  check_index(ranks, x, "ranks", at::kInt, num_segments);
  TORCH_CHECK(layer_idx >= 0, "layer_idx must be >= 0, got ", layer_idx);

  const c10::cuda::CUDAGuard guard(x.device());
  const ShrinkParams p{v.data_ptr(),
                       v.stride(0),
                       static_cast<int>(v.size(1)),
                       x.data_ptr(),
                       x.stride(0),
                       a_ptrs.data_ptr<int64_t>(),
                       seg_starts.data_ptr<int32_t>(),
                       ranks.data_ptr<int32_t>(),
                       static_cast<int>(num_segments),
                       static_cast<int>(num_rows),
                       static_cast<int>(x.size(1)),
                       static_cast<int>(layer_idx)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(dispatch_dtype_rank<ShrinkLaunch>(x.scalar_type(), v.size(1), p, stream),
               "sgmv_shrink");
}

void expand_op(at::Tensor y, const at::Tensor& v, const at::Tensor& b_ptrs,
               const at::Tensor& seg_starts, const at::Tensor& ranks, const at::Tensor& scales,
               int64_t layer_idx) {
  check_rows(v, v, "v", 1);
  check_rows(y, v, "y", 2);
  const int64_t num_rows = v.size(0), num_segments = b_ptrs.size(0);
  TORCH_CHECK(y.size(0) == num_rows, "y must have ", num_rows, " rows, got ", y.size(0));
  TORCH_CHECK(y.size(1) % 8 == 0, "h_out must be a multiple of 8, got ", y.size(1));
  check_index(b_ptrs, v, "b_ptrs", at::kLong, num_segments);
  check_index(seg_starts, v, "seg_starts", at::kInt, num_segments + 1);
  check_index(ranks, v, "ranks", at::kInt, num_segments);
  check_index(scales, v, "scales", at::kFloat, num_segments);
  TORCH_CHECK(layer_idx >= 0, "layer_idx must be >= 0, got ", layer_idx);

  const c10::cuda::CUDAGuard guard(v.device());
  const ExpandParams p{y.data_ptr(),
                       y.stride(0),
                       v.data_ptr(),
                       v.stride(0),
                       static_cast<int>(v.size(1)),
                       b_ptrs.data_ptr<int64_t>(),
                       seg_starts.data_ptr<int32_t>(),
                       ranks.data_ptr<int32_t>(),
                       scales.data_ptr<float>(),
                       static_cast<int>(num_segments),
                       static_cast<int>(num_rows),
                       static_cast<int>(y.size(1)),
                       static_cast<int>(layer_idx)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(dispatch_dtype_rank<ExpandLaunch>(v.scalar_type(), v.size(1), p, stream),
               "sgmv_expand");
}

}  // namespace

TORCH_LIBRARY(lorafleet, m) {
  m.def(
      "sgmv_shrink(Tensor(a!) v, Tensor x, Tensor a_ptrs, Tensor seg_starts, Tensor ranks, "
      "int layer_idx) -> ()");
  m.def(
      "sgmv_expand(Tensor(a!) y, Tensor v, Tensor b_ptrs, Tensor seg_starts, Tensor ranks, "
      "Tensor scales, int layer_idx) -> ()");
}

TORCH_LIBRARY_IMPL(lorafleet, CUDA, m) {
  m.impl("sgmv_shrink", &shrink_op);
  m.impl("sgmv_expand", &expand_op);
}

}  // namespace lorafleet
