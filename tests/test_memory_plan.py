"""KV pool planning: one budget for activations, adapters and KV pages (CUDA memory faked)."""

from __future__ import annotations

import pytest
import torch

from shard.__main__ import build_engine
from shard.config import parse_config
from shard.layers.lora import MAX_GROUP
from shard.memory_plan import lora_activation_bytes, plan_kv_pages
from shard.model_config import load_model_config
from shard.parallel import SINGLE

GIB = 2**30
CUDA = torch.device("cuda", 0)


def config(tiny, *extra: str):
    argv = ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir), *extra]
    return parse_config([*argv, "--device", "cpu"], env={})


def test_cuda_budget_is_fraction_of_free_less_activations_and_adapters(tiny, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * GIB, 80 * GIB))
    cfg = config(tiny, "--kv-memory-fraction", "0.5", "--adapter-memory-mb", "1024")
    pages = plan_kv_pages(
        cfg, page_bytes=2**20, device=CUDA, max_context=4096, activation_bytes=3 * GIB
    )
    assert pages == (20 * GIB - 3 * GIB - 1 * GIB) // 2**20


def test_cuda_budget_exhausted_names_the_knobs(tiny, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * GIB, 80 * GIB))
    cfg = config(tiny, "--kv-memory-fraction", "0.5", "--adapter-memory-mb", "2048")
    with pytest.raises(RuntimeError, match="--max-prefill-tokens or --adapter-memory-mb"):
        plan_kv_pages(
            cfg, page_bytes=2**20, device=CUDA, max_context=4096, activation_bytes=1 * GIB
        )


def test_explicit_pages_and_cpu_default(tiny) -> None:
    assert plan_kv_pages(config(tiny, "--kv-pages", "77"), 1, CUDA, 4096, 0) == 77
    cfg = config(tiny, "--max-batch-size", "4", "--page-size", "16")
    assert plan_kv_pages(cfg, 1, torch.device("cpu"), 100, 0) == -(-4 * 100 // 16)


def test_lora_activation_bytes_cover_the_widest_projection(tiny) -> None:
    """The warm-up runs no adapter, so the LoRA delta of the widest projection (gate/up here) and
    the shrink's scratch are added to its measured peak."""
    _, _, leader = build_engine(config(tiny), SINGLE)
    model = leader.state.runner.model
    gate_up = 2 * load_model_config(tiny.model_dir).intermediate_size
    tokens, rank = 100, 16
    expected = tokens * (MAX_GROUP * rank + 2 * gate_up) * 4  # float32 on CPU
    assert lora_activation_bytes(model, tokens, rank) == expected
