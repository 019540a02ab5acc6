// Torch-free instantiations of the SGMV expand kernels (compiled by .ci/compile-kernels too).
#include "sgmv_expand.cuh"

namespace lorafleet {
#define LORAFLEET_EXPAND(T, R) \
  template cudaError_t sgmv_expand<T, R>(const ExpandParams&, cudaStream_t);
LORAFLEET_EXPAND(__half, 16)
LORAFLEET_EXPAND(__half, 32)
LORAFLEET_EXPAND(__half, 64)
LORAFLEET_EXPAND(__half, 128)
LORAFLEET_EXPAND(__nv_bfloat16, 16)
LORAFLEET_EXPAND(__nv_bfloat16, 32)
LORAFLEET_EXPAND(__nv_bfloat16, 64)
LORAFLEET_EXPAND(__nv_bfloat16, 128)
}  // namespace lorafleet
