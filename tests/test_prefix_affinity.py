"""Prefix affinity through real routers and two real tiny shards: a request goes to the shard
whose prefix cache holds its prefix when the policy ranks the shards equal, never to a less busy
one, and with `--prefix-affinity off` placement ignores prefixes.

Which shard served a request shows in its usage: only the shard that holds the prompt's prefix
reports cached prompt tokens."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from protos.prefix_key import HEAD_TOKENS, prefix_key
from router.local_process import free_port
from tests.fleet import wait_until
from tests.processes import shard_args, start, stop, wait_serving
from tests.reference import greedy

pytestmark = pytest.mark.slow
ADAPTER = "r8-all"


def _prompt(seed: int) -> list[int]:
    """A prompt of its own (page size 4: 17 full blocks of 70 tokens are cacheable)."""
    return [(37 * i + 13 * seed) % 280 + 9 for i in range(HEAD_TOKENS + 6)]


def _request(prompt: list[int], new: int = 2) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        adapter_id=ADAPTER,
        prompt_token_ids=generate_pb2.TokenIds(ids=prompt),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=new, ignore_eos=True),
    )


def _generate(address: str, request: generate_pb2.GenerateRequest) -> list:
    with grpc.insecure_channel(address) as channel:
        return list(generate_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=60))


def _holds(shard: str, key: int) -> bool:
    with grpc.insecure_channel(shard) as channel:
        stream = shard_pb2_grpc.ShardStub(channel).WatchLoad(
            shard_pb2.WatchLoadRequest(prefix_keys=True), timeout=5
        )
        snapshot = next(stream).snapshot
        stream.cancel()
    return key in snapshot.prefix_keys


@pytest.fixture(scope="module")
def fleet(tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two shards, and a router with prefix affinity on and one with it off over both."""
    logs = Path(tmp_path_factory.mktemp("logs"))
    procs = []
    try:
        shards = []
        for name in ("s0", "s1"):
            port = free_port()
            procs.append(start(shard_args(tiny, port), logs / f"{name}.log"))
            shards.append(f"127.0.0.1:{port}")
        for address, proc, name in zip(shards, procs, ("s0", "s1"), strict=True):
            wait_serving(address, proc, logs / f"{name}.log")
        routers = {}
        for affinity in ("on", "off"):
            port, metrics = free_port(), free_port()
            args = ["router", "--host", "127.0.0.1", "--port", str(port), "--http-port", "0"]
            args += ["--shard", shards[0], "--shard", shards[1], "--prefix-affinity", affinity]
            args += ["--metrics-port", str(metrics)]
            routers[f"{affinity}_metrics"] = str(metrics)
            procs.append(start(args, logs / f"router-{affinity}.log"))
            address = f"127.0.0.1:{port}"
            wait_serving(address, procs[-1], logs / f"router-{affinity}.log")
            routers[affinity] = address

            def both_serving(address: str = address) -> bool:
                with grpc.insecure_channel(address) as channel:
                    info = generate_pb2_grpc.GeneratorStub(channel).GetInfo(
                        generate_pb2.GetInfoRequest(), timeout=5
                    )
                return len(info.shards) == 2

            wait_until(both_serving, "the router to serve both shards", 30)
        # Both hold the adapter, so equal shards tie on the lowest address: `first` gets a
        # request whose prefix no shard holds.
        for address in shards:
            _generate(address, _request([1, 2, 3]))
        first, second = sorted(shards)
        yield {"first": first, "second": second, **routers}
    finally:
        for proc in reversed(procs):
            stop(proc)


def _samples(port: str, metric: str) -> dict[str, float]:
    """A router's samples of a metric with one label, by label value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.findall(rf'^{metric}\{{\w+="([^"]+)"\}} (\S+)$', text, re.M)
    return {label: float(value) for label, value in found}


def _placements(fleet: dict[str, str]) -> dict[str, float]:
    """The affinity router's lorafleet_router_prefix_placements_total, by result."""
    return _samples(fleet["on_metrics"], "lorafleet_router_prefix_placements_total")


def _both_routers_see_idle_shards(fleet: dict[str, str]) -> None:
    """A request that just ended leaves its shard busy in a router's view until the shard's
    next snapshot: wait for it, so that equal shards tie (and a busy one does not win)."""

    def idle() -> bool:
        for router in ("on", "off"):
            running = _samples(fleet[f"{router}_metrics"], "lorafleet_router_shard_running")
            if running != {fleet["first"]: 0.0, fleet["second"]: 0.0}:
                return False
        return True

    wait_until(idle, "both routers to see both shards idle", 10)


def _warm(fleet: dict[str, str], prompt: list[int]) -> None:
    """Prefills `prompt` on `second` directly, and waits until the routers can know it: the
    shard reports its key, and a snapshot reaches every watcher within a heartbeat (1 s)."""
    shard = fleet["second"]
    _generate(shard, _request(prompt))
    key = prefix_key(_request(prompt))
    assert key is not None
    wait_until(lambda: _holds(shard, key), "the shard to report the prefix key", 10)
    time.sleep(1.2)
    _both_routers_see_idle_shards(fleet)


def test_request_goes_to_the_idle_shard_holding_its_prefix_only_with_affinity(fleet, tiny):
    on_prompt, off_prompt = _prompt(1), _prompt(2)
    _warm(fleet, on_prompt)
    _warm(fleet, off_prompt)
    before = _placements(fleet)
    on = _generate(fleet["on"], _request(on_prompt, 4))
    assert _placements(fleet)["held"] == before.get("held", 0) + 1
    _both_routers_see_idle_shards(fleet)
    off = _generate(fleet["off"], _request(off_prompt, 4))
    cacheable = (len(on_prompt) - 1) // 4 * 4
    assert on[-1].usage.cached_prompt_tokens == cacheable  # on `second`, which holds it
    assert off[-1].usage.cached_prompt_tokens == 0  # on `first`, the tie's pick
    want, _ = greedy(tiny.model_dir, tiny.adapter_dir(ADAPTER), on_prompt, 4)
    assert [t for m in on for t in m.token_ids] == want


def test_affinity_does_not_wake_an_idle_shard_while_a_busy_one_has_room(fleet):
    """`first` runs a long request; `second` is idle but holds the prefix: consolidation keeps
    the request on the busy shard (no cached tokens there), affinity does not override it."""
    prompt = _prompt(3)
    _warm(fleet, prompt)
    busy = _request([5, 6, 7, 8, 9, 10, 11, 12], 240)
    started, finished = threading.Event(), threading.Event()

    def run_busy() -> None:
        with grpc.insecure_channel(fleet["on"]) as channel:
            for _ in generate_pb2_grpc.GeneratorStub(channel).Generate(busy, timeout=120):
                started.set()
        finished.set()

    thread = threading.Thread(target=run_busy)
    thread.start()
    try:
        assert started.wait(60)
        assert not _holds(fleet["first"], prefix_key(_request(prompt)) or 0)
        placed_while_busy = not finished.is_set()
        reply = _generate(fleet["on"], _request(prompt))
    finally:
        thread.join(120)
    assert placed_while_busy, "the long request ended before the check: the test proves nothing"
    assert reply[-1].usage.cached_prompt_tokens == 0  # on `first`, the busy shard
    assert _placements(fleet)["not_held"] >= 1
