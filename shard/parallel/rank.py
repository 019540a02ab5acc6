"""What one tensor-parallel rank holds: its slice of the model, KV cache and adapters, and its
runner. Built by `shard.compose`; the leader and followers run steps on it."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from shard.adapters.cache import AdapterCache
from shard.engine.kv_cache import KvCache
from shard.engine.model_runner import ModelRunner
from shard.model.config import ModelConfig
from shard.parallel.group import TPGroup


@dataclass(frozen=True, slots=True)
class RankState:
    """What one rank holds."""

    model_cfg: ModelConfig
    tokenizer: Tokenizer
    runner: ModelRunner
    adapters: AdapterCache
    kv: KvCache
    group: TPGroup
