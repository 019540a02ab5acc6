"""The adapter lifecycle through real gRPC calls to a shard served in this process: fail-closed
validation with precise statuses, path escapes, more adapters than fit, hot reload."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from shard.adapters.cache import AdapterCache
from shard.adapters.loader import AdapterError, AdapterErrorKind, packed_size
from shard.adapters.replicas import MAX_CHANGED_RETRIES, Replicas
from shard.adapters.tiers import Resident
from shard.compose import build_adapter_cache, build_engine
from shard.config import parse_config
from shard.edge.server import GeneratorServicer, ShardServicer
from shard.parallel.group import SINGLE
from tests.reference import greedy

NEW = 12
LONG = 120  # tokens of the stream that must outlive a reload
SOURCES = ("r8-all", "r16-attn", "r8-all", "r16-attn", "r8-all", "r16-attn")
CROWD = tuple(f"crowd-{i}" for i in range(len(SOURCES)))  # distinct ids, 3x what fits
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _copy(tiny, source: str, root: Path, name: str) -> Path:
    return Path(shutil.copytree(tiny.adapter_dir(source), root / name))


def _edit_weights(folder: Path, key_part: str, fn) -> None:
    tensors = load_file(folder / WEIGHTS)
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = fn(tensors[key]).contiguous()
    save_file(tensors, folder / WEIGHTS)


def _edit_config(folder: Path, **changes: object) -> None:
    conf = json.loads((folder / CONFIG).read_text())
    conf.update(changes)
    (folder / CONFIG).write_text(json.dumps(conf))


@pytest.fixture(scope="module")
def root(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter root with good copies of the tiny adapters and one folder per way to fail."""
    base = tmp_path_factory.mktemp("adapter-root")
    root = base / "root"
    root.mkdir()
    for a in tiny.adapter_ids:
        _copy(tiny, a, root, a)
    for name, source in zip(CROWD, SOURCES, strict=True):
        _copy(tiny, source, root, name)
    _copy(tiny, "r8-all", root, "hot")

    bad = _copy(tiny, "r4-qv", root, "bad-target")
    _edit_config(bad, target_modules=["q_proj", "lm_head"])
    _edit_weights(_copy(tiny, "r8-all", root, "bad-shape"), "q_proj.lora_A", lambda t: t[:, :32])
    # GQA: k_proj's output is num_kv_heads * head_dim = 32 wide, not hidden_size = 64.
    _edit_weights(_copy(tiny, "r8-all", root, "bad-gqa"), "k_proj.lora_B", lambda t: t.repeat(2, 1))
    pickled = _copy(tiny, "r4-qv", root, "pickle-only")
    (pickled / WEIGHTS).rename(pickled / "adapter_model.bin")
    no_config = _copy(tiny, "r4-qv", root, "no-config")
    (no_config / CONFIG).unlink()
    for name in ("other-base-warn", "other-base-error"):
        _edit_config(
            _copy(tiny, "r4-qv", root, name), base_model_name_or_path="meta-llama/Llama-2-7b-hf"
        )
    outside = _copy(tiny, "r4-qv", base, "outside")
    (root / "escape-link").symlink_to(outside, target_is_directory=True)
    file_link = _copy(tiny, "r4-qv", root, "file-link")
    (file_link / WEIGHTS).unlink()
    (file_link / WEIGHTS).symlink_to(outside / WEIGHTS)
    return root


class InProcessShard:
    """A shard's engine and both gRPC services on a loopback port, served from a thread."""

    def __init__(self, tiny, root: Path, *flags: str) -> None:
        argv = ["--model", str(tiny.model_dir), "--adapters", str(root), "--device", "cpu"]
        self.engine, self.service, _ = build_engine(
            parse_config([*argv, "--page-size", "4", *flags], env={}), SINGLE
        )
        self.adapters: AdapterCache = self.service.adapters
        self.engine.start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        self.address = f"127.0.0.1:{port}"

    async def _start(self) -> int:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        generate_pb2_grpc.add_GeneratorServicer_to_server(
            GeneratorServicer(self.service), self.server
        )
        shard_pb2_grpc.add_ShardServicer_to_server(ShardServicer(self.service), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.engine.stop()
        self.adapters.close()

    def metric(self, name: str, **labels: str) -> float:
        return self.engine.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def shard(tiny, root: Path) -> Iterator[InProcessShard]:
    s = InProcessShard(tiny, root, "--max-lora-rank", "32")
    try:
        yield s
    finally:
        s.close()


def request(adapter: str, prompt: list[int], new: int = NEW) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        adapter_id=adapter,
        prompt_token_ids=generate_pb2.TokenIds(ids=prompt),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=new, ignore_eos=True),
    )


def generate(address: str, req: generate_pb2.GenerateRequest, timeout: float = 120) -> list[int]:
    with grpc.insecure_channel(address) as ch:
        stream = generate_pb2_grpc.GeneratorStub(ch).Generate(req, timeout=timeout)
        return [t for m in stream for t in m.token_ids]


def load_adapter(address: str, adapter: str) -> generate_pb2.AdapterInfo:
    with grpc.insecure_channel(address) as ch:
        stub = shard_pb2_grpc.ShardStub(ch)
        return stub.LoadAdapter(
            shard_pb2.LoadAdapterRequest(adapter_id=adapter), timeout=60
        ).adapter


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
    _copy(tiny, "r16-attn", root, "listed-first")
    (_copy(tiny, "r4-qv", root, "unreadable-config") / CONFIG).write_text("{not json")

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
