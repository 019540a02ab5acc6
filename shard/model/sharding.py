"""Which slice of each full (unsharded) weight a tensor-parallel rank holds.

Shared by the base-model loader and the adapter loader so a LoRA B slice always lines up with
the base weight rows it adds to, and a LoRA A slice with the input columns of its layer.
"""

from __future__ import annotations

from shard.model.config import ModelConfig
from shard.parallel.group import TPGroup


def kv_heads(cfg: ModelConfig, group: TPGroup) -> range:
    """The KV heads this rank holds: its even share when there are at least as many heads as
    ranks, else a replica of one head (consecutive ranks share a head)."""
    n, size = cfg.num_kv_heads, group.size
    if n >= size:
        per = group.split(n, "num_key_value_heads")
        return range(group.rank * per, (group.rank + 1) * per)
    if size % n:
        raise ValueError(
            f"tensor-parallel size {size} must be a multiple of num_key_value_heads {n} to "
            "replicate KV heads"
        )
    head = group.rank * n // size
    return range(head, head + 1)


def local_kv_heads(cfg: ModelConfig, group: TPGroup) -> int:
    """How many KV heads one rank holds (`kv_heads`)."""
    return len(kv_heads(cfg, group))


def output_rows(cfg: ModelConfig, group: TPGroup, module: str) -> slice:
    """Rows of a column-parallel weight [out, in] (and of LoRA B^T) held by this rank."""
    if module in ("k_proj", "v_proj"):
        heads = kv_heads(cfg, group)
        return slice(heads.start * cfg.head_dim, heads.stop * cfg.head_dim)
    _, out = cfg.projection_shape(module)
    width = group.split(out, module)
    return slice(group.rank * width, (group.rank + 1) * width)


def input_cols(cfg: ModelConfig, group: TPGroup, module: str) -> slice:
    """Columns of a row-parallel weight [out, in] (and rows of LoRA A^T) held by this rank."""
    inp, _ = cfg.projection_shape(module)
    width = group.split(inp, module)
    return slice(group.rank * width, (group.rank + 1) * width)
