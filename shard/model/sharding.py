"""Which slice of each full (unsharded) weight a tensor-parallel rank holds.

Shared by the base-model loader and the adapter loader so a LoRA B slice always lines up with
the base weight rows it adds to, and a LoRA A slice with the input columns of its layer.
"""

from __future__ import annotations

from shard.model.config import ModelConfig
from shard.parallel.group import TPGroup

ROW_PARALLEL = ("o_proj", "down_proj")


def output_rows(cfg: ModelConfig, group: TPGroup, module: str) -> slice:
    """Rows of a column-parallel weight [out, in] (and of LoRA B^T) held by this rank."""
    _, out = cfg.projection_shape(module)
    if module in ("k_proj", "v_proj") and cfg.num_kv_heads < group.size:
        # Fewer KV heads than ranks: each rank keeps a replica of one head.
        head = group.rank * cfg.num_kv_heads // group.size
        return slice(head * cfg.head_dim, (head + 1) * cfg.head_dim)
    width = group.split(out, module)
    return slice(group.rank * width, (group.rank + 1) * width)


def input_cols(cfg: ModelConfig, group: TPGroup, module: str) -> slice:
    """Columns of a row-parallel weight [out, in] (and rows of LoRA A^T) held by this rank."""
    inp, _ = cfg.projection_shape(module)
    width = group.split(inp, module)
    return slice(group.rank * width, (group.rank + 1) * width)
