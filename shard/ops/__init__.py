"""Custom ops: SGMV LoRA shrink/expand and paged attention (CUDA kernels from csrc/, plain-torch
reference on CPU).

The only part that loads the compiled extension (``build``). Imports torch and nothing of shard/.
"""

from shard.ops.sgmv import sgmv_expand, sgmv_shrink, weight_ptrs

__all__ = ["sgmv_expand", "sgmv_shrink", "weight_ptrs"]
