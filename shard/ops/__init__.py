"""Custom ops: SGMV LoRA shrink/expand (CUDA kernels from csrc/, plain-torch reference on CPU)."""

from shard.ops.sgmv import sgmv_expand, sgmv_shrink, weight_ptrs

__all__ = ["sgmv_expand", "sgmv_shrink", "weight_ptrs"]
