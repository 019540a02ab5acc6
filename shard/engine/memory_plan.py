"""Device memory planning at start: the KV page pool gets what the weights, the largest step's
activations, the decode graphs captured at start and the adapter budget leave of the configured
share of free memory."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import torch

from shard.adapters.tiers import device_budget_bytes
from shard.engine.graph_shapes import warm_keys, width_classes
from shard.engine.kv_cache import KvCache, pages_for
from shard.engine.model_runner import ModelRunner
from shard.engine.step_plan import PrefillPlan, Step, StepPlan
from shard.model.config import ModelConfig
from shard.model.layers.linear import MergedColumnLinear, RowLinear
from shard.model.llama import LlamaForCausalLM
from shard.model.projections import MAX_GROUP_PROJECTIONS
from shard.parallel.group import TPGroup

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class MemoryFlags:
    """The shard's flags that size its memory (`shard.compose.memory_flags` reads them)."""

    kv_pages: int | None  # explicit KV pool size; None: planned from the rest
    kv_memory_fraction: float  # share of device memory free after the weights (CUDA)
    kv_memory_mb: int  # most memory for KV pages on CPU
    adapter_memory_mb: int  # device budget for resident adapters
    page_size: int  # tokens per KV page
    max_batch_size: int  # requests in the running batch
    max_prefill_tokens: int  # prompt tokens per step
    max_lora_rank: int
    decode_graphs: bool  # decode steps replay CUDA graphs (CUDA with --cuda-graphs on)
    graph_warmup: tuple[int, ...]  # LoRA rank classes whose decode graphs are captured at start


def plan_kv_pages(
    flags: MemoryFlags,
    page_bytes: int,
    device: torch.device,
    max_context: int,
    activation_bytes: int,
) -> int:
    """KV pool size: the flag; on CUDA, the configured share of the memory left free by the
    weights, less `activation_bytes` (the warm-up's activation peak and the start-up decode
    graphs) and the device adapter budget (one budget for activations, graphs, KV pages and
    adapters); on CPU, room for a full batch at full context, or what `--kv-memory-mb` holds
    when that is less."""
    if flags.kv_pages is not None:
        return flags.kv_pages
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * flags.kv_memory_fraction) - activation_bytes
        budget -= device_budget_bytes(flags.adapter_memory_mb)
        if budget < page_bytes:
            raise RuntimeError(
                f"no device memory left for the KV cache: {free / 2**30:.1f} GiB free after the "
                f"weights, activations and start-up decode graphs need "
                f"{activation_bytes / 2**30:.2f} GiB and adapters {flags.adapter_memory_mb} MiB; "
                "lower --max-prefill-tokens or --adapter-memory-mb, capture fewer graphs "
                "(--graph-warmup), or raise --kv-memory-fraction"
            )
        return budget // page_bytes
    full = -(-flags.max_batch_size * max_context // flags.page_size)
    budget = flags.kv_memory_mb * 2**20 // page_bytes
    if budget < 1:
        raise RuntimeError(
            f"--kv-memory-mb {flags.kv_memory_mb} holds no KV page of "
            f"{page_bytes / 2**20:.1f} MiB: raise it or give --kv-pages"
        )
    return min(full, budget)


def activation_peak(
    model: LlamaForCausalLM, flags: MemoryFlags, model_cfg: ModelConfig, group: TPGroup
) -> int:
    """Bytes the largest prefill step allocates beyond the weights, measured by running one
    (over a temporary KV cache) on CUDA; 0 elsewhere."""
    device = next(model.parameters()).device
    if device.type != "cuda" or flags.kv_pages is not None:
        return 0
    dtype = next(model.parameters()).dtype
    tokens = min(flags.max_prefill_tokens, model_cfg.max_context)
    pages = tuple(range(pages_for(tokens, flags.page_size)))
    kv = KvCache(model_cfg, group, len(pages), flags.page_size, dtype, device)
    runner = ModelRunner(model, kv, device)
    plan = StepPlan(
        input_ids=(0,) * tokens,
        positions=tuple(range(tokens)),
        slots=(),
        decode_pages=(),
        decode_context=(),
        prefills=(PrefillPlan(0, tokens, tokens, pages),),
        logits_rows=(tokens - 1,),
        segments=((0, ""),),
    )
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.forward(Step(plan, (None,)))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del runner, kv
    torch.cuda.empty_cache()
    lora = lora_activation_bytes(model, tokens, flags.max_lora_rank)
    log.info(
        "activation peak measured",
        tokens=tokens,
        mib=round(peak / 2**20, 1),
        lora_mib=round(lora / 2**20, 1),
    )
    return peak + lora


# What a captured decode graph holds beyond its logits and page tables, as measured (not broken
# down further): 68 MiB for the 16 graphs of the tiny model on an H200, whose logits and tables
# are a few KiB each (tests/test_graph_warmup.py's GPU test).
GRAPH_OVERHEAD_BYTES = 4 * 2**20


def decode_graph_bytes(flags: MemoryFlags, model_cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Device memory the decode graphs of `--graph-warmup` hold, when the KV pool is planned on
    CUDA with graphs on; else 0. An upper bound: widths up to the longest context, though the
    warm-up stops at the pool's (the pool is not sized yet).

    The graphs share one pool, captured largest first: each keeps its float32 logits
    [batch, vocab]; its other tensors die with its capture and serve the next graphs, so beyond
    the kept logits the pool holds the first capture's transient, mostly its logits in `dtype`
    and their float32 copy. Each shape also keeps static inputs, mostly its int32 page tables
    [batch, width]. Beyond those, each graph took GRAPH_OVERHEAD_BYTES in a measurement. Shapes
    captured later, on first use, come out of the headroom that --kv-memory-fraction leaves."""
    if not flags.decode_graphs or flags.kv_pages is not None:
        return 0
    widths = width_classes(pages_for(model_cfg.max_context, flags.page_size))
    keys = warm_keys(flags.max_batch_size, flags.graph_warmup, widths)
    if not keys:
        return 0
    vocab = model_cfg.vocab_size
    kept = sum(k.batch for k in keys) * vocab * 4
    transient = max(k.batch for k in keys) * vocab * (dtype.itemsize + 4)
    tables = sum(k.batch * k.width for k in keys) * 4
    total = kept + transient + tables + len(keys) * GRAPH_OVERHEAD_BYTES
    log.info("decode graph memory reserved", graphs=len(keys), mib=round(total / 2**20, 1))
    return total


def lora_activation_bytes(model: LlamaForCausalLM, tokens: int, max_rank: int) -> int:
    """What LoRA adds to a `tokens`-row step beyond the warm-up, which runs no adapter: the
    shrink's scratch [T, MAX_GROUP_PROJECTIONS * rank], the widest projection's LoRA delta
    [T, width] and, where the chain after it runs eagerly, the sum of that projection and its
    delta."""
    widest = max(
        m.weight.shape[0] for m in model.modules() if isinstance(m, MergedColumnLinear | RowLinear)
    )
    size = next(model.parameters()).element_size()
    return tokens * (MAX_GROUP_PROJECTIONS * max_rank + 2 * widest) * size
