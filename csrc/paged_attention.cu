// Torch-free instantiations of the paged KV kernels (compiled by .ci/compile-kernels too).
#include "paged_attention.cuh"

namespace lorafleet {

cudaError_t kv_append(const KvAppendParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return cudaSuccess;
  const int64_t chunks = static_cast<int64_t>(p.num_rows) * (p.row_bytes / 16);
  const int blocks = static_cast<int>((chunks + 255) / 256 < 65535 ? (chunks + 255) / 256 : 65535);
  attention::kv_append_kernel<<<blocks, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t paged_decode_attention<__half, 64>(const DecodeParams&, cudaStream_t);
template cudaError_t paged_decode_attention<__half, 128>(const DecodeParams&, cudaStream_t);
template cudaError_t paged_decode_attention<__nv_bfloat16, 64>(const DecodeParams&, cudaStream_t);
template cudaError_t paged_decode_attention<__nv_bfloat16, 128>(const DecodeParams&,
                                                                 cudaStream_t);

}  // namespace lorafleet
