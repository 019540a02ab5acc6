"""The KV-head rule of tensor parallelism: split when there are enough heads, else replicated,
the same for the model's layers, its KV cache and the k/v weight slices (base and LoRA)."""

from __future__ import annotations

import dataclasses

import pytest

from shard.model.config import load_model_config
from shard.model.sharding import kv_heads, local_kv_heads, output_rows
from shard.parallel.group import TPGroup


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_every_kv_head_is_held_and_each_rank_holds_its_k_v_rows(tiny, num_kv_heads, size) -> None:
    cfg = dataclasses.replace(load_model_config(tiny.model_dir), num_kv_heads=num_kv_heads)
    held = [kv_heads(cfg, TPGroup(r, size)) for r in range(size)]
    assert sorted({h for heads in held for h in heads}) == list(range(num_kv_heads))
    if num_kv_heads >= size:  # an even split: every head on exactly one rank
        assert [h for heads in held for h in heads] == list(range(num_kv_heads))
    else:  # one replica per rank, each head on size / num_kv_heads consecutive ranks
        assert [list(heads) for heads in held] == [[r * num_kv_heads // size] for r in range(size)]
    for r, heads in enumerate(held):
        group = TPGroup(r, size)
        assert local_kv_heads(cfg, group) == len(heads)
        for module in ("k_proj", "v_proj"):
            rows = output_rows(cfg, group, module)
            assert (rows.start, rows.stop) == (
                heads.start * cfg.head_dim,
                heads.stop * cfg.head_dim,
            )


def test_kv_heads_refuse_a_size_they_cannot_replicate_onto(tiny) -> None:
    cfg = dataclasses.replace(load_model_config(tiny.model_dir), num_kv_heads=2)
    with pytest.raises(ValueError, match="must be a multiple of num_key_value_heads 2"):
        kv_heads(cfg, TPGroup(0, 3))
