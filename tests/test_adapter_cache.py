"""The adapter cache's residency through real gRPC calls to a shard served in this process:
waiting for residency, three times more adapters than fit (with instant and in-flight copies),
pins held to half the device budget, tensor-parallel claims."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from protos import shard_pb2, shard_pb2_grpc
from shard.adapters.cache import AdapterCache
from shard.adapters.loader import AdapterError, AdapterErrorKind, packed_size
from shard.adapters.replicas import MAX_CHANGED_RETRIES, Replicas
from shard.adapters.tiers import Resident
from shard.parallel.group import SINGLE
from tests.adapter_shard import CROWD, NEW, SOURCES, generate, request
from tests.reference import greedy


def test_wait_resident_ends_at_residency_at_the_deadline_or_once_closed(shard, root) -> None:
    """The one wait of LoadAdapter and of tensor-parallel followers: the claimed state once
    resident; None when the deadline passes with device memory full of adapters in use, or at
    once when the cache is closed."""
    cpu = torch.device("cpu")
    cache = AdapterCache(root, shard.adapters.cfg, SINGLE, torch.float32, cpu, 2**30, 32)
    try:
        held = cache.wait_resident("r8-all", time.monotonic() + 30, claim=True)
        assert isinstance(held, Resident) and held.refs == 1
        # No room next to the claimed version.
        cache.device_tier.budget_bytes = cache.device_tier.used_bytes
        cache.lookup("crowd-0")  # a copy of r8-all: the same size, so its read is not refused
        while cache.entry("crowd-0").residency != "host":
            time.sleep(0.01)
        started = time.monotonic()
        assert cache.wait_resident("crowd-0", started + 0.2) is None
        assert time.monotonic() - started >= 0.2
        assert cache.waits["no_room"] > 0
        cache.close()
        started = time.monotonic()
        assert cache.wait_resident("crowd-0", started + 30) is None
        assert time.monotonic() - started < 1
    finally:
        cache.close()


class SlowCopy:
    """Stands in for the CUDA event of a host-to-device copy that takes `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.done_at = time.perf_counter() + seconds

    def query(self) -> bool:
        return time.perf_counter() >= self.done_at

    def wait(self, stream: None = None) -> None:
        """What the compute stream does for a claimed copy in flight (here: the host waits)."""
        self.waited = True
        time.sleep(max(0.0, self.done_at - time.perf_counter()))


@pytest.fixture(params=["instant", "async"])
def copies(request, shard, monkeypatch: pytest.MonkeyPatch) -> str:
    """Device copies done at once (CPU) or finishing a few steps later, as on a GPU, where
    copies for different waiting requests must not evict each other before they are claimed."""
    if request.param == "async":
        to_device = shard.adapters._to_device

        def slow(key, host):
            res = to_device(key, host)
            res.ready, res.source = SlowCopy(0.005), host
            return res

        monkeypatch.setattr(shard.adapters, "_to_device", slow)
    return request.param


def test_three_times_more_adapters_than_fit_all_complete_exactly(shard, tiny, copies) -> None:
    cache = shard.adapters
    for a in ("r8-all", "r16-attn"):
        assert cache.preload(a, False, 30) is None
    sizes = {a: packed_size(cache.weights(a)) for a in ("r8-all", "r16-attn")}
    cache.evict("r8-all")
    cache.evict("r16-attn")
    # Two adapters fit on the device (never three), three in host memory.
    cache.device_tier.budget_bytes = 2 * max(sizes.values()) + 1024
    cache.host_tier.budget_bytes = 3 * max(sizes.values()) + 1024
    assert 3 * min(sizes.values()) > cache.device_tier.budget_bytes
    prompts = [[10 + i, 20 + i, 30, 40 + i] for i in range(len(CROWD))]
    gpu_evictions = shard.metric("lorafleet_shard_adapter_evictions_total", tier="gpu")
    host_evictions = shard.metric("lorafleet_shard_adapter_evictions_total", tier="host")
    results: dict[int, list[int] | BaseException] = {}

    def run(i: int) -> None:
        try:
            results[i] = generate(shard.address, request(CROWD[i], prompts[i]), timeout=60)
        except BaseException as e:  # reported below with its index
            results[i] = e

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CROWD))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    finally:
        cache.device_tier.budget_bytes = 2048 * 2**20
        cache.host_tier.budget_bytes = 8192 * 2**20
    for i, source in enumerate(SOURCES):
        assert not isinstance(results[i], BaseException), (CROWD[i], results[i])
        assert results[i] == greedy(tiny.model_dir, tiny.adapter_dir(source), prompts[i], NEW)[0]
    assert shard.metric("lorafleet_shard_adapter_evictions_total", tier="gpu") > gpu_evictions
    assert shard.metric("lorafleet_shard_adapter_evictions_total", tier="host") > host_evictions
    assert shard.metric("lorafleet_shard_adapter_lookups_total", tier="disk", result="hit") >= 6
    assert shard.metric("lorafleet_shard_adapter_load_seconds_count", stage="disk_to_host") >= 6
    assert shard.metric("lorafleet_shard_adapter_queue_seconds_count", adapter=CROWD[0]) >= 1


def test_pins_hold_at_most_half_the_device_budget(shard) -> None:
    cache = shard.adapters
    saved = cache.device_tier.budget_bytes
    assert cache.preload("r8-all", False, 30) is None
    size = packed_size(cache.weights("r8-all"))
    cache.device_tier.budget_bytes = 3 * size  # room for three: one pin fits in half, two do not
    try:
        with grpc.insecure_channel(shard.address) as ch:
            stub = shard_pb2_grpc.ShardStub(ch)
            pin = shard_pb2.LoadAdapterRequest(adapter_id="r8-all", pin=True)
            assert stub.LoadAdapter(pin, timeout=60).adapter.adapter_id == "r8-all"
            with pytest.raises(grpc.RpcError) as err:
                stub.LoadAdapter(
                    shard_pb2.LoadAdapterRequest(adapter_id="r16-attn", pin=True), timeout=60
                )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than half of the device adapter budget" in err.value.details()
        assert "--adapter-memory-mb" in err.value.details()
        # Refused as a pin, still served unpinned; the first pin stands.
        assert len(generate(shard.address, request("r16-attn", [7, 8, 9]))) == NEW
        assert cache.residency.pinned == {"r8-all"}
    finally:
        cache.evict("r8-all")
        cache.evict("r16-attn")
        cache.device_tier.budget_bytes = saved


def test_tensor_parallel_claims_wait_for_every_rank_and_fail_cleanly_on_changing_files(
    shard, tiny
) -> None:
    """Rank 0's side of two-phase residency, with the followers' answers faked: a version is
    asked of the followers once (not per request) with what rank 0 keeps on its device; files
    that keep changing under the followers end in ABORTED, and the shard serves on."""
    cache = shard.adapters
    rounds: list[tuple[str, tuple[str, ...]]] = []
    answer: list[AdapterError | None] = [None]

    def replicate(key: str, keep: tuple[str, ...]) -> AdapterError | None:
        rounds.append((key, keep))
        return answer[0]

    cache._replicas = Replicas(replicate)  # as rank 0 of a tensor-parallel group
    try:
        prompt = [3, 4, 5]
        want = greedy(tiny.model_dir, tiny.adapter_dir("r16-attn"), prompt, NEW)[0]
        assert generate(shard.address, request("r16-attn", prompt)) == want
        assert generate(shard.address, request("r16-attn", prompt)) == want
        key = cache.versions.current["r16-attn"]
        assert [k for k, _ in rounds] == [key]
        assert all(k in cache._resident for k in rounds[0][1])

        rounds.clear()
        answer[0] = AdapterError(AdapterErrorKind.CHANGED, "adapter 'r8-all' changed on disk")
        with pytest.raises(grpc.RpcError) as err:
            generate(shard.address, request("r8-all", prompt), timeout=30)
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "changed on disk" in err.value.details()
        # Rank 0 read the files again before each retry; it gave up after the last one.
        assert len(rounds) == MAX_CHANGED_RETRIES + 1
        assert "r8-all" not in cache.versions.current
    finally:
        cache._replicas = None
        cache.evict("r16-attn")
    assert (
        generate(shard.address, request("r8-all", prompt))
        == greedy(tiny.model_dir, tiny.adapter_dir("r8-all"), prompt, NEW)[0]
    )
