// Torch-free instantiations of the fused SGMV shrink + expand (compiled by .ci/compile-kernels too).
#include "sgmv_fused.cuh"

namespace lorafleet {
#define LORAFLEET_FUSED(T, R) \
  template cudaError_t sgmv_fused<T, R>(const FusedParams&, cudaStream_t);
LORAFLEET_FUSED(__half, 16)
LORAFLEET_FUSED(__half, 32)
LORAFLEET_FUSED(__half, 64)
LORAFLEET_FUSED(__half, 128)
LORAFLEET_FUSED(__nv_bfloat16, 16)
LORAFLEET_FUSED(__nv_bfloat16, 32)
LORAFLEET_FUSED(__nv_bfloat16, 64)
LORAFLEET_FUSED(__nv_bfloat16, 128)
}  // namespace lorafleet
