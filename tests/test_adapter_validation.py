"""Fail-closed adapter validation through real gRPC calls to a shard served in this process:
each way an adapter folder can be wrong gets its precise status and message."""

from __future__ import annotations

import grpc
import pytest
import torch

from shard.compose import build_adapter_cache
from shard.config import parse_config
from shard.parallel.group import SINGLE
from tests.adapter_shard import NEW, generate, load_adapter, request

FAILED = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("adapter", "code", "needles"),
    [
        ("bad-target", FAILED, ("target module 'lm_head' is not supported",)),
        ("r64-all-rslora", FAILED, ("rank r=64 is outside the supported 1..32",)),
        ("bad-shape", FAILED, ("q_proj", "lora_A (8, 32)", "expected lora_A (8, 64)")),
        ("bad-gqa", FAILED, ("k_proj", "lora_B (64, 8)", "lora_B (32, 8)")),
        ("pickle-only", FAILED, ("adapter_model.safetensors is missing", "pickle")),
        ("no-config", grpc.StatusCode.NOT_FOUND, ("no-config/adapter_config.json",)),
        ("no-such-adapter", grpc.StatusCode.NOT_FOUND, ("not found",)),
        ("../x", INVALID, ("not a valid name",)),
        ("/etc", INVALID, ("not a valid name",)),
        ("escape-link", INVALID, ("resolves outside the adapter root",)),
        ("file-link", INVALID, ("adapter_model.safetensors links outside the adapter root",)),
    ],
)
def test_invalid_adapter_gets_precise_status(shard, adapter: str, code, needles) -> None:
    for call in (
        lambda: generate(shard.address, request(adapter, [1, 2, 3])),
        lambda: load_adapter(shard.address, adapter),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code, err.value.details()
        for needle in needles:
            assert needle in err.value.details()


def test_base_model_mismatch_warns_or_fails_by_flag(shard, tiny) -> None:
    flags = ["--adapter-base-mismatch", "error", "--adapter-host-memory-mb", "64"]
    cfg = parse_config(
        ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir), *flags], env={}
    )
    assert (cfg.adapter_base_mismatch, cfg.adapter_host_memory_mb) == ("error", 64)
    cache = build_adapter_cache(cfg, shard.adapters.cfg, SINGLE, torch.float32, torch.device("cpu"))
    assert (cache.base_mismatch, cache.host_tier.budget_bytes) == ("error", 64 * 2**20)
    cache.close()

    assert len(generate(shard.address, request("other-base-warn", [4, 5, 6]))) == NEW
    shard.adapters.base_mismatch = "error"
    try:
        with pytest.raises(grpc.RpcError) as err:
            generate(shard.address, request("other-base-error", [4, 5, 6]))
    finally:
        shard.adapters.base_mismatch = "warn"
    assert err.value.code() == FAILED
    assert "trained on base model 'meta-llama/Llama-2-7b-hf'" in err.value.details()
