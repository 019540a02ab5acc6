// Torch-free instantiations of the SGMV shrink kernels (compiled by .ci/compile-kernels too).
#include "sgmv_shrink.cuh"

namespace lorafleet {
#define LORAFLEET_SHRINK(T, R) \
  template cudaError_t sgmv_shrink<T, R>(const ShrinkParams&, cudaStream_t);
LORAFLEET_SHRINK(__half, 16)
LORAFLEET_SHRINK(__half, 32)
LORAFLEET_SHRINK(__half, 64)
LORAFLEET_SHRINK(__half, 128)
LORAFLEET_SHRINK(__nv_bfloat16, 16)
LORAFLEET_SHRINK(__nv_bfloat16, 32)
LORAFLEET_SHRINK(__nv_bfloat16, 64)
LORAFLEET_SHRINK(__nv_bfloat16, 128)
}  // namespace lorafleet
