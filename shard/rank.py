"""One tensor-parallel rank: its slice of the model, KV cache and adapters; followers replay the
step plans that rank 0 broadcasts."""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
import torch
from tokenizers import Tokenizer

from shard.adapter_cache import AdapterCache
from shard.adapter_loader import AdapterError
from shard.config import ShardConfig
from shard.kv_cache import KvCache
from shard.loader import build_model, load_tokenizer
from shard.model_config import ModelConfig, load_model_config
from shard.model_runner import ModelRunner
from shard.parallel import TPGroup, broadcast_object, destroy, init_group
from shard.step_plan import StepPlan

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RankState:
    """What one rank holds."""

    model_cfg: ModelConfig
    tokenizer: Tokenizer
    runner: ModelRunner
    adapters: AdapterCache
    kv: KvCache
    group: TPGroup


def rank_device(cfg: ShardConfig, group: TPGroup) -> torch.device:
    return torch.device("cuda", group.rank) if cfg.device == "cuda" else torch.device("cpu")


def plan_kv_pages(cfg: ShardConfig, page_bytes: int, device: torch.device, max_context: int) -> int:
    """KV pool size: the flag, or the configured share of free device memory minus the adapter
    budget; on CPU, room for a full batch at full context."""
    if cfg.kv_pages is not None:
        return cfg.kv_pages
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * cfg.kv_memory_fraction) - cfg.adapter_memory_mb * 2**20
        return max(1, budget // page_bytes)
    return -(-cfg.max_batch_size * max_context // cfg.page_size)


def build_rank(cfg: ShardConfig, group: TPGroup) -> RankState:
    """Loads this rank's slice of everything; every rank agrees on rank 0's KV pool size."""
    device = rank_device(cfg, group)
    dtype = getattr(torch, cfg.dtype)
    model_cfg = load_model_config(cfg.model)
    model = build_model(model_cfg, cfg.model, group, dtype, device)
    page_bytes = KvCache.bytes_per_page(model_cfg, group, cfg.page_size, dtype)
    pages = plan_kv_pages(cfg, page_bytes, device, model_cfg.max_position_embeddings)
    pages = int(broadcast_object(pages, group))  # type: ignore[arg-type]
    kv = KvCache(model_cfg, group, pages, cfg.page_size, dtype, device)
    adapters = AdapterCache(
        cfg.adapters,
        model_cfg,
        group,
        dtype,
        device,
        cfg.adapter_memory_mb * 2**20,
        cfg.max_lora_rank,
    )
    runner = ModelRunner(model, kv, adapters.weights, cfg.max_lora_rank, device)
    return RankState(model_cfg, load_tokenizer(cfg.model), runner, adapters, kv, group)


def leader_forward(state: RankState):
    """Rank 0's forward: broadcast the plan, then run it like every other rank."""
    if state.group.size == 1:
        return state.runner.forward

    def forward(plan: StepPlan) -> torch.Tensor:
        broadcast_object(plan, state.group)
        return state.runner.forward(plan)

    return forward


def stop_followers(state: RankState) -> None:
    if state.group.size > 1:
        broadcast_object(None, state.group)


def ensure_resident(adapters: AdapterCache, adapter_ids: tuple[str, ...]) -> None:
    """Blocks until every adapter of a plan is resident on this rank."""
    for adapter_id in adapter_ids:
        while (state := adapters.poll(adapter_id)) is None:
            time.sleep(0.001)
        if isinstance(state, AdapterError):
            raise state


def follower_main(cfg: ShardConfig, rank: int) -> None:
    """Entry point of ranks 1..N-1: replay plans until rank 0 sends None."""
    group = init_group(rank, cfg.tp, rank_device(cfg, TPGroup(rank, cfg.tp)))
    torch.set_grad_enabled(False)
    state = build_rank(cfg, group)
    log.info("follower ready", rank=rank)
    try:
        while (plan := broadcast_object(None, group)) is not None:
            assert isinstance(plan, StepPlan)
            ensure_resident(state.adapters, plan.adapters)
            state.runner.forward(plan)
    finally:
        destroy(group)
