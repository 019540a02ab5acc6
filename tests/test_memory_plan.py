"""KV pool planning: one budget for activations, adapters and KV pages (CUDA memory faked)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shard.compose import build_engine, memory_flags
from shard.config import parse_config
from shard.engine.kv_cache import KvCache
from shard.engine.memory_plan import lora_activation_bytes, plan_kv_pages
from shard.model.config import load_model_config
from shard.model.projections import MAX_GROUP_PROJECTIONS
from shard.parallel.group import SINGLE

GIB = 2**30
CUDA = torch.device("cuda", 0)


def config(tiny, *extra: str):
    argv = ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir), *extra]
    return parse_config([*argv, "--device", "cpu"], env={})


def flags(tiny, *extra: str):
    return memory_flags(config(tiny, *extra))


def test_cuda_budget_is_fraction_of_free_less_activations_and_adapters(tiny, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * GIB, 80 * GIB))
    cfg = flags(tiny, "--kv-memory-fraction", "0.5", "--adapter-memory-mb", "1024")
    pages = plan_kv_pages(
        cfg, page_bytes=2**20, device=CUDA, max_context=4096, activation_bytes=3 * GIB
    )
    assert pages == (20 * GIB - 3 * GIB - 1 * GIB) // 2**20


def test_cuda_budget_exhausted_names_the_knobs(tiny, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * GIB, 80 * GIB))
    cfg = flags(tiny, "--kv-memory-fraction", "0.5", "--adapter-memory-mb", "2048")
    with pytest.raises(RuntimeError, match="--max-prefill-tokens or --adapter-memory-mb"):
        plan_kv_pages(
            cfg, page_bytes=2**20, device=CUDA, max_context=4096, activation_bytes=1 * GIB
        )


def test_explicit_pages_and_cpu_default(tiny) -> None:
    assert plan_kv_pages(flags(tiny, "--kv-pages", "77"), 1, CUDA, 4096, 0) == 77
    cfg = flags(tiny, "--max-batch-size", "4", "--page-size", "16")
    assert plan_kv_pages(cfg, 1, torch.device("cpu"), 100, 0) == -(-4 * 100 // 16)


def test_cpu_pool_is_capped_by_kv_memory_mb(tiny) -> None:
    """A full batch at full context, unless --kv-memory-mb holds less: a 135M model (SmolLM2's
    shape: 30 layers, 3 KV heads of 64, 8K context) gets 1 GiB of pages by default instead of
    the 11 GiB (12 GB) a batch of 32 full contexts would take, which took a minute to start."""
    cpu = torch.device("cpu")
    smol = dataclasses.replace(
        load_model_config(tiny.model_dir),
        num_layers=30,
        num_kv_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
    )
    page_bytes = KvCache.bytes_per_page(smol, SINGLE, 16, torch.float32)
    cfg = flags(tiny)
    pages = plan_kv_pages(cfg, page_bytes, cpu, 8192, 0)
    assert pages == 1024 * 2**20 // page_bytes
    assert 32 * 8192 * page_bytes // 16 > 11 * GIB > 10 * pages * page_bytes
    assert pages * 16 >= 8192  # one full-context request still fits
    smaller = flags(tiny, "--kv-memory-mb", "64")
    assert plan_kv_pages(smaller, page_bytes, cpu, 8192, 0) == 64 * 2**20 // page_bytes
    # The cap never grows a pool past a full batch at full context.
    assert plan_kv_pages(cfg, page_bytes, cpu, 256, 0) == 32 * 256 // 16
    with pytest.raises(RuntimeError, match="--kv-memory-mb 1 holds no KV page"):
        plan_kv_pages(flags(tiny, "--kv-memory-mb", "1"), 2 * 2**20, cpu, 8192, 0)


def test_lora_activation_bytes_cover_the_widest_projection(tiny) -> None:
    """The warm-up runs no adapter, so the LoRA delta of the widest projection (gate/up here) and
    the shrink's scratch are added to its measured peak."""
    _, _, leader = build_engine(config(tiny), SINGLE)
    model = leader.state.runner.model
    gate_up = 2 * load_model_config(tiny.model_dir).intermediate_size
    tokens, rank = 100, 16
    expected = tokens * (MAX_GROUP_PROJECTIONS * rank + 2 * gate_up) * 4  # float32 on CPU
    assert lora_activation_bytes(model, tokens, rank) == expected
