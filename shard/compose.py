"""The composition root: builds a shard rank from its config, every part given what it needs
when it is made. Rank 0 gets the engine and the gRPC service on top (`build_engine`); ranks
1..N-1 replay rank 0's plans (`follower_main`)."""

from __future__ import annotations

from collections.abc import Callable

import structlog
import torch

from shard.adapters.cache import AdapterCache
from shard.adapters.replicas import Replicate
from shard.adapters.tiers import device_budget_bytes
from shard.config import ShardConfig
from shard.edge.chat_template import load_chat_template
from shard.edge.load_feed import LoadFeed
from shard.edge.server import ShardService
from shard.engine.decode_graphs import DecodeGraphs
from shard.engine.engine import Engine
from shard.engine.executor import LocalExecutor
from shard.engine.inbox import Inbox
from shard.engine.kv_cache import KvCache, pages_for
from shard.engine.memory_plan import (
    MemoryFlags,
    activation_peak,
    decode_graph_bytes,
    plan_kv_pages,
)
from shard.engine.model_runner import ModelRunner
from shard.engine.prefix_cache import PrefixCache
from shard.engine.prefix_index import BlockIndex
from shard.engine.scheduler import Scheduler
from shard.metrics import ShardMetrics
from shard.model import fusion
from shard.model.config import ModelConfig, load_model_config
from shard.model.llama import LlamaForCausalLM
from shard.model.loader import build_model, load_tokenizer
from shard.parallel.channel import PlanChannel
from shard.parallel.follower import replay
from shard.parallel.group import TPGroup, broadcast_object, init_group
from shard.parallel.leader import Leader
from shard.parallel.rank import RankState

log = structlog.get_logger(__name__)


def rank_device(cfg: ShardConfig, group: TPGroup) -> torch.device:
    return torch.device("cuda", group.rank) if cfg.device == "cuda" else torch.device("cpu")


def build_rank(
    cfg: ShardConfig,
    group: TPGroup,
    metrics: ShardMetrics | None = None,
    replicate: Replicate | None = None,
    index: BlockIndex | None = None,
) -> RankState:
    """Loads this rank's slice of everything; every rank agrees on rank 0's KV pool size.
    `metrics`: rank 0's counters (followers export none); `replicate`: how rank 0 of a
    tensor-parallel group has its followers hold an adapter version; `index`: rank 0's prefix
    cache index, which the KV pool and the adapter cache tell of reclaimed pages and retired
    versions."""
    device = rank_device(cfg, group)
    dtype = getattr(torch, cfg.dtype)
    fusion.set_enabled(cfg.compile)
    if device.type == "cuda":
        # Process-wide: every rank of a process serves the same model with the same flags.
        torch.backends.cuda.preferred_blas_library(cfg.blas)
    model_cfg = load_model_config(cfg.model)
    model = build_model(model_cfg, cfg.model, group, dtype, device, cfg.load_format)
    page_bytes = KvCache.bytes_per_page(model_cfg, group, cfg.page_size, dtype)
    memory = memory_flags(cfg)
    activations = activation_peak(model, memory, model_cfg, group)
    activations += decode_graph_bytes(memory, model_cfg, dtype)
    max_context = model_cfg.max_context
    pages = plan_kv_pages(memory, page_bytes, device, max_context, activations)
    agreed = broadcast_object(pages, group)
    assert isinstance(agreed, int)  # rank 0 sends its own count
    pages = agreed
    on_reclaim = index.reclaimed if index is not None else None
    kv = KvCache(model_cfg, group, pages, cfg.page_size, dtype, device, on_reclaim)
    on_retired = index.retire if index is not None else None
    adapters = build_adapter_cache(
        cfg, model_cfg, group, dtype, device, metrics, replicate, on_retired
    )
    graphs = build_decode_graphs(cfg, model, kv, device, max_context, metrics)
    runner = ModelRunner(model, kv, device, graphs)
    return RankState(model_cfg, load_tokenizer(cfg.model), runner, adapters, kv, group)


def memory_flags(cfg: ShardConfig) -> MemoryFlags:
    """The flags the memory plan sizes the shard by."""
    return MemoryFlags(
        kv_pages=cfg.kv_pages,
        kv_memory_fraction=cfg.kv_memory_fraction,
        kv_memory_mb=cfg.kv_memory_mb,
        adapter_memory_mb=cfg.adapter_memory_mb,
        page_size=cfg.page_size,
        max_batch_size=cfg.max_batch_size,
        max_prefill_tokens=cfg.max_prefill_tokens,
        max_lora_rank=cfg.max_lora_rank,
        decode_graphs=cfg.device == "cuda" and cfg.cuda_graphs,
        graph_warmup=cfg.graph_warmup,
    )


def build_adapter_cache(
    cfg: ShardConfig,
    model_cfg: ModelConfig,
    group: TPGroup,
    dtype: torch.dtype,
    device: torch.device,
    metrics: ShardMetrics | None = None,
    replicate: Replicate | None = None,
    on_retired: Callable[[str], None] | None = None,
) -> AdapterCache:
    """The adapter cache that the shard's flags describe."""
    return AdapterCache(
        cfg.adapters,
        model_cfg,
        group,
        dtype,
        device,
        device_budget_bytes(cfg.adapter_memory_mb),
        cfg.max_lora_rank,
        host_budget_bytes=cfg.adapter_host_memory_mb * 2**20,
        base_mismatch=cfg.adapter_base_mismatch,
        metrics=metrics,
        replicate=replicate,
        on_retired=on_retired,
    )


def build_decode_graphs(
    cfg: ShardConfig,
    model: LlamaForCausalLM,
    kv: KvCache,
    device: torch.device,
    max_context: int,
    metrics: ShardMetrics | None = None,
) -> DecodeGraphs | None:
    """The rank's decode graphs (CUDA with --cuda-graphs on), with the --graph-warmup rank
    classes captured before the shard serves. Every rank captures the same shapes in the same
    order, as the tensor-parallel collectives inside each captured forward require."""
    if device.type != "cuda" or not cfg.cuda_graphs:
        return None
    max_pages = pages_for(max_context, cfg.page_size)
    graphs = DecodeGraphs(
        model, kv, cfg.max_batch_size, max_pages, device, use_graphs=True, metrics=metrics
    )
    graphs.warm_up(cfg.graph_warmup)
    return graphs


def build_engine(cfg: ShardConfig, group: TPGroup) -> tuple[Engine, ShardService, Leader]:
    """Loads rank 0's slice of everything and builds the engine and the gRPC service over it;
    a lost tensor-parallel rank kills the engine. Where a part must tell one built after it
    (a lost rank, a load change, a reclaimed page, a retired adapter version), what it tells is
    made first and given to both: the inbox, the load feed and the prefix cache's index."""
    metrics = ShardMetrics()
    inbox, load_feed = Inbox(), LoadFeed()
    channel = PlanChannel(group, min(1.0, cfg.tp_timeout_s / 4), on_lost=inbox.fail)
    index = BlockIndex(metrics) if cfg.prefix_cache else None
    replicate = channel.replicate if group.size > 1 else None
    state = build_rank(cfg, group, metrics, replicate, index)
    leader = Leader(state, channel)
    model_cfg = state.model_cfg
    max_context = model_cfg.max_context
    scheduler = Scheduler(
        state.kv.pool,
        cfg.page_size,
        cfg.max_batch_size,
        cfg.max_prefill_tokens,
        state.adapters,
        prefix_cache(cfg, state, index, metrics) if index is not None else None,
    )
    engine = Engine(
        scheduler,
        leader if group.size > 1 else LocalExecutor(state.runner),
        state.tokenizer,
        model_cfg.eos_token_ids,
        max_context,
        cfg.max_queue,
        metrics,
        inbox,
        load_feed.changed_threadsafe,
    )
    service = ShardService(
        engine,
        state.adapters,
        state.tokenizer,
        model_cfg,
        cfg.shard_id,
        group.size,
        max_context,
        load_feed,
        load_chat_template(cfg.model, state.tokenizer),
    )
    log.info(
        "shard ready",
        model=model_cfg.name,
        architecture=model_cfg.architecture,
        device=cfg.device,
        dtype=cfg.dtype,
        tp=group.size,
        kv_pages=state.kv.pool.total,
        page_size=cfg.page_size,
        max_context=max_context,
        # A windowed model (Mistral) is served up to its window: past it, requests are refused.
        sliding_window=model_cfg.sliding_window,
    )
    channel.start()
    return engine, service, leader


def prefix_cache(
    cfg: ShardConfig, state: RankState, index: BlockIndex, metrics: ShardMetrics
) -> PrefixCache:
    """The prefix cache over the KV pool and `index`, which the pool and the adapter cache were
    made to tell of reclaimed pages and of retired adapter versions (whose blocks then go)."""
    adapters = state.adapters
    return PrefixCache(
        state.kv.pool,
        index,
        cfg.page_size,
        lambda key: not key or adapters.is_current(key),
        metrics,
    )


def follower_main(cfg: ShardConfig, rank: int) -> None:
    """Entry point of ranks 1..N-1: build this rank, then replay plans until rank 0 sends None."""
    group = init_group(rank, cfg.tp, rank_device(cfg, TPGroup(rank, cfg.tp)), cfg.tp_timeout_s)
    torch.set_grad_enabled(False)
    state = build_rank(cfg, group)
    log.info("follower ready", rank=rank)
    replay(state, cfg.tp_timeout_s / 2)
