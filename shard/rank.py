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
from shard.decode_graphs import DecodeGraphs
from shard.kv_cache import KvCache, pages_for
from shard.loader import build_model, load_tokenizer
from shard.memory_plan import activation_peak, plan_kv_pages
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


def build_rank(cfg: ShardConfig, group: TPGroup) -> RankState:
    """Loads this rank's slice of everything; every rank agrees on rank 0's KV pool size."""
    device = rank_device(cfg, group)
    dtype = getattr(torch, cfg.dtype)
    model_cfg = load_model_config(cfg.model)
    model = build_model(model_cfg, cfg.model, group, dtype, device, cfg.load_format)
    page_bytes = KvCache.bytes_per_page(model_cfg, group, cfg.page_size, dtype)
    activations = activation_peak(model, cfg, model_cfg, group)
    max_context = model_cfg.max_position_embeddings
    pages = plan_kv_pages(cfg, page_bytes, device, max_context, activations)
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
    graphs = None
    if device.type == "cuda" and cfg.cuda_graphs:
        max_pages = pages_for(max_context, cfg.page_size)
        graphs = DecodeGraphs(model, kv, cfg.max_batch_size, max_pages, device, use_graphs=True)
    runner = ModelRunner(model, kv, adapters.weights, cfg.max_lora_rank, device, graphs)
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
