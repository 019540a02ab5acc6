"""Adapters as a client lists and reloads them, through real gRPC calls to a shard served in
this process: hot reload under a running stream, ListAdapters before and after a load,
LoadAdapter without listing the root."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest

from protos import generate_pb2, generate_pb2_grpc
from tests.adapter_shard import CONFIG, NEW, WEIGHTS, copy_adapter, generate, load_adapter, request
from tests.reference import greedy

LONG = 120  # tokens of the stream that must outlive a reload


def _replace_files(src: Path, dst: Path) -> None:
    """Replaces an adapter's two files the way deployments should: new file, then rename."""
    for name in (CONFIG, WEIGHTS):
        tmp = dst / f".{name}.new"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)


def test_hot_reload_old_stream_keeps_old_weights_new_gets_new(shard, tiny, root: Path) -> None:
    old_src, new_src = tiny.adapter_dir("r8-all"), tiny.adapter_dir("r16-attn")
    prompt = [7, 8, 9, 10]
    old_tokens: list[int] = []
    started = threading.Event()

    def old_stream() -> None:
        with grpc.insecure_channel(shard.address) as ch:
            stub = generate_pb2_grpc.GeneratorStub(ch)
            for msg in stub.Generate(request("hot", prompt, LONG), timeout=120):
                old_tokens.extend(msg.token_ids)
                if len(old_tokens) >= 3:
                    started.set()

    runner = threading.Thread(target=old_stream)
    runner.start()
    assert started.wait(60)
    _replace_files(new_src, root / "hot")
    info = load_adapter(shard.address, "hot")
    assert len(old_tokens) < LONG  # the old stream is still running across the reload
    assert info.digest == hashlib.sha256((new_src / WEIGHTS).read_bytes()).hexdigest()
    new_tokens = generate(shard.address, request("hot", prompt))
    runner.join(120)
    assert old_tokens == greedy(tiny.model_dir, old_src, prompt, LONG)[0]
    assert new_tokens == greedy(tiny.model_dir, new_src, prompt, NEW)[0] != old_tokens[:NEW]

    # Replaced files are noticed on the next request as well, without LoadAdapter.
    time.sleep(0.01)  # a new mtime even on coarse clocks
    _replace_files(old_src, root / "hot")
    assert generate(shard.address, request("hot", prompt)) == old_tokens[:NEW]
    with grpc.insecure_channel(shard.address) as ch:
        listed = generate_pb2_grpc.GeneratorStub(ch).ListAdapters(
            generate_pb2.ListAdaptersRequest(), timeout=10
        )
    hot = next(a for a in listed.adapters if a.adapter_id == "hot")
    assert hot.digest == hashlib.sha256((old_src / WEIGHTS).read_bytes()).hexdigest()
    assert hot.residency == generate_pb2.ADAPTER_RESIDENCY_CPU
    assert len([k for k in shard.adapters.resident_ids() if k == "hot"]) == 1


def test_list_adapters_tells_rank_before_a_load_and_no_gpu_on_a_cpu_shard(
    shard, tiny, root: Path
) -> None:
    """Before a load: DISK with the rank and targets adapter_config.json declares (0 and none
    when it cannot be read); loaded on a CPU shard: CPU, never GPU."""
    copy_adapter(tiny, "r16-attn", root, "listed-first")
    (copy_adapter(tiny, "r4-qv", root, "unreadable-config") / CONFIG).write_text("{not json")

    def listed() -> dict[str, generate_pb2.AdapterInfo]:
        with grpc.insecure_channel(shard.address) as ch:
            reply = generate_pb2_grpc.GeneratorStub(ch).ListAdapters(
                generate_pb2.ListAdaptersRequest(), timeout=10
            )
        return {a.adapter_id: a for a in reply.adapters}

    before = listed()
    fresh, unreadable = before["listed-first"], before["unreadable-config"]
    assert fresh.residency == generate_pb2.ADAPTER_RESIDENCY_DISK
    assert (fresh.rank, fresh.size_bytes, fresh.digest) == (16, 0, "")
    assert set(fresh.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert unreadable.residency == generate_pb2.ADAPTER_RESIDENCY_DISK
    assert (unreadable.rank, list(unreadable.target_modules)) == (0, [])
    assert load_adapter(shard.address, "listed-first").residency == (
        generate_pb2.ADAPTER_RESIDENCY_CPU
    )
    after = listed()
    assert (after["listed-first"].residency, after["listed-first"].rank) == (
        generate_pb2.ADAPTER_RESIDENCY_CPU,
        16,
    )
    assert after["listed-first"].size_bytes > 0
    assert all(a.residency != generate_pb2.ADAPTER_RESIDENCY_GPU for a in after.values())
    shard.adapters.evict("listed-first")


def test_load_adapter_reports_one_adapter_without_listing_the_root(
    shard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoadAdapter answers from the cache's maps: O(1) however many folders the root holds."""

    def listing(self) -> None:
        raise AssertionError("LoadAdapter listed the adapter root")

    monkeypatch.setattr(type(shard.adapters.root), "iterdir", listing)
    info = load_adapter(shard.address, "r4-qv")
    assert info.adapter_id == "r4-qv"
    assert info.residency == generate_pb2.ADAPTER_RESIDENCY_CPU
    assert info.rank == 4 and info.size_bytes > 0 and len(info.digest) == 64
    assert set(info.target_modules) == {"q_proj", "v_proj"}
    shard.adapters.evict("r4-qv")
