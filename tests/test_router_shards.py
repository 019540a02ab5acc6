"""The shard table against an in-process shard: eligibility, accounting, gauges, reconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from protos import shard_pb2, shard_pb2_grpc
from router import shards
from router.local_process import free_port
from router.metrics import RouterMetrics
from router.policy import Demand
from router.shard_table import ShardTable

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class LoadFeed(shard_pb2_grpc.ShardServicer):
    """WatchLoad sends whatever snapshot the test puts in the queue."""

    def __init__(self) -> None:
        self.snapshots: asyncio.Queue[shard_pb2.LoadSnapshot] = asyncio.Queue()

    async def WatchLoad(self, request, context) -> AsyncIterator[shard_pb2.WatchLoadResponse]:
        while True:
            yield shard_pb2.WatchLoadResponse(snapshot=await self.snapshots.get())


async def start_shard(port: int) -> tuple[grpc.aio.Server, LoadFeed, health_aio.HealthServicer]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    feed, health = LoadFeed(), health_aio.HealthServicer()
    shard_pb2_grpc.add_ShardServicer_to_server(feed, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health.set("", SERVING)
    return server, feed, health


def snapshot(running: int, free: int = 90) -> shard_pb2.LoadSnapshot:
    return shard_pb2.LoadSnapshot(
        running=running, max_batch_size=8, kv_pages_free=free, kv_pages_total=100, kv_page_size=16
    )


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def scenario(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    server, feed, health = await start_shard(port)
    metrics = RouterMetrics()
    table = ShardTable(metrics)
    changes: list[int] = []
    table.subscribe(lambda: changes.append(1))

    def gauge(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(f"lorafleet_router_{name}", labels)

    def running() -> int | None:
        loads = table.loads()
        return loads[0].running if loads else None

    table.add(address)
    await asyncio.sleep(0.2)
    assert table.loads() == [] and gauge("shards") == 0  # SERVING, but no snapshot yet
    await feed.snapshots.put(snapshot(2))
    await until(lambda: running() == 2, "the first snapshot")
    assert gauge("shards") == 1
    assert gauge("shard_running", shard=address) == 2
    assert gauge("shard_kv_pages_used", shard=address) == 10

    # A dispatch counts at once; the snapshot that shows the batch grown takes it over.
    reservation = table.get(address).reserve(Demand("a", context_tokens=40))  # 3 pages
    (load,) = table.loads()
    assert (load.running, load.kv_pages_free) == (3, 87)
    await feed.snapshots.put(snapshot(3, free=87))
    await until(lambda: gauge("shard_running", shard=address) == 3, "the grown snapshot")
    assert running() == 3
    reservation.release()  # already taken over: no double count, no change fired
    assert running() == 3

    # The shard's first answer beats the snapshot that shows the request (snapshots come on
    # another stream): the request still counts until a snapshot after the answer, which also
    # accounts for it before any older reservation still on its way.
    handle = table.get(address)
    older = handle.reserve(Demand("a", context_tokens=40))
    answered = handle.reserve(Demand("a", context_tokens=40))
    answered.answered()
    assert running() == 5
    await feed.snapshots.put(snapshot(4, free=84))
    await until(lambda: gauge("shard_running", shard=address) == 4, "the snapshot after it")
    assert running() == 5  # 4 reported (the answered one among them) + the older one
    answered.release()
    assert running() == 5
    older.release()  # its call ended before any snapshot showed it
    assert running() == 4
    await feed.snapshots.put(snapshot(3, free=87))
    await until(lambda: running() == 3, "the shard back at 3")

    await health.set("", NOT_SERVING)
    await until(lambda: not table.loads(), "NOT_SERVING to take the shard out")
    assert gauge("shards") == 0
    await health.set("", SERVING)
    await until(lambda: running() == 3, "SERVING to bring it back")

    # Silence is staleness: no event fires, yet placement and the gauge both see it.
    monkeypatch.setattr(shards, "STALE_AFTER_HEARTBEATS", 0.2)
    fired = len(changes)
    await until(lambda: not table.loads(), "the snapshot to go stale")
    assert gauge("shards") == 0 and len(changes) == fired
    await feed.snapshots.put(snapshot(2))
    await until(lambda: running() == 2, "a fresh snapshot")
    monkeypatch.setattr(shards, "STALE_AFTER_HEARTBEATS", 5.0)

    # A restarted shard is found again by the same watches.
    await server.stop(None)
    await until(lambda: not table.loads(), "the lost load stream")
    server, feed, health = await start_shard(port)
    await feed.snapshots.put(snapshot(1))
    await until(lambda: running() == 1, "the reconnected load stream")
    assert gauge("shards") == 1

    await table.remove(address)
    assert table.loads() == [] and gauge("shards") == 0
    assert gauge("shard_running", shard=address) is None
    await server.stop(None)


def test_table_follows_health_snapshots_staleness_and_restarts(monkeypatch: pytest.MonkeyPatch):
    asyncio.run(asyncio.wait_for(scenario(monkeypatch), 30))


async def residency_and_idleness() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    server, feed, _ = await start_shard(port)
    metrics = RouterMetrics()
    table = ShardTable(metrics)

    def gauge(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(f"lorafleet_router_{name}", labels)

    def resident() -> frozenset[str] | None:
        loads = table.loads()
        return loads[0].adapters_resident if loads else None

    table.add(address)
    full = snapshot(0)
    full.adapters_resident.extend(["a", "b"])
    full.idle_s = 30.0
    await feed.snapshots.put(full)
    await until(lambda: resident() == {"a", "b"}, "the full residency")
    # Idle as the shard counts it (30 s), carried on by the router's clock.
    assert gauge("shard_idle_seconds", shard=address) >= 30.0 and gauge("shards_idle") == 1

    delta = snapshot(1)
    delta.adapters_delta = True
    delta.adapters_added.append("c")
    delta.adapters_removed.append("a")
    await feed.snapshots.put(delta)
    await until(lambda: resident() == {"b", "c"}, "the delta applied")
    assert gauge("shard_idle_seconds", shard=address) == 0 and gauge("shards_idle") == 0
    before = resident()
    unchanged = snapshot(1, free=80)
    unchanged.adapters_delta = True
    await feed.snapshots.put(unchanged)
    await until(lambda: gauge("shard_kv_pages_used", shard=address) == 20, "the next snapshot")
    assert resident() is before  # nothing changed: the index keeps its residency sets

    await feed.snapshots.put(snapshot(0))  # idle again, from now on
    await until(lambda: gauge("shards_idle") == 1, "the shard idle again")
    assert gauge("shard_idle_seconds", shard=address) < 5.0
    reservation = table.get(address).reserve(Demand("a", context_tokens=10))
    assert gauge("shard_idle_seconds", shard=address) == 0 and gauge("shards_idle") == 0
    reservation.release()
    assert gauge("shards_idle") == 1
    await table.close()
    await server.stop(None)


def test_table_applies_residency_deltas_and_tracks_idleness():
    asyncio.run(asyncio.wait_for(residency_and_idleness(), 30))


async def marks_until_next_snapshot() -> None:
    handle = shards.ShardHandle(
        "127.0.0.1:1", RouterMetrics(), lambda _: None, lambda _: None, shard_pb2.WatchLoadRequest
    )
    beat = shard_pb2.WatchLoadResponse(
        snapshot=shard_pb2.LoadSnapshot(
            running=1, max_batch_size=8, kv_pages_free=50, kv_pages_total=64, kv_page_size=16
        )
    )
    handle._accept(beat)
    for mark, field, marked in (
        (handle.mark_full, "kv_pages_free", 0),
        (handle.mark_draining, "draining", True),
    ):
        mark()
        assert getattr(handle._load, field) == marked
        # The shard's load did not move, so its next message repeats the last one: still the
        # shard's word, which replaces what the router assumed.
        handle._accept(beat)
        assert getattr(handle._load, field) == getattr(beat.snapshot, field)
    await handle.channel.close()


def test_a_heartbeat_replaces_a_full_or_draining_mark():
    """After a KV-exhausted or draining migration the router marks the shard; a shard whose load
    then stays the same sends only heartbeats, which must lift the mark (else it is never placed
    on again)."""
    asyncio.run(asyncio.wait_for(marks_until_next_snapshot(), 10))


async def prefix_keys_reach_the_load() -> None:
    seen: list[shards.ShardHandle] = []
    handle = shards.ShardHandle(
        "127.0.0.1:1", RouterMetrics(), seen.append, lambda _: None, shard_pb2.WatchLoadRequest
    )
    load = dict(running=1, max_batch_size=8, kv_pages_free=50, kv_pages_total=64, kv_page_size=16)
    handle._accept(shard_pb2.WatchLoadResponse(snapshot=shard_pb2.LoadSnapshot(**load)))
    keyed = shard_pb2.LoadSnapshot(**load, prefix_keys_delta=True, prefix_keys_added=[7])
    handle._accept(shard_pb2.WatchLoadResponse(snapshot=keyed))
    assert len(seen) == 2 and handle._load is not None and handle._load.prefix_keys == {7}
    await handle.channel.close()


def test_prefix_keys_follow_full_lists_and_deltas():
    before = frozenset({1, 2})
    full = shard_pb2.LoadSnapshot(prefix_keys=[2, 3])
    assert shards.prefix_keys_after(full, before) == {2, 3}
    assert shards.prefix_keys_after(shard_pb2.LoadSnapshot(prefix_keys=[1, 2]), before) is before
    delta = shard_pb2.LoadSnapshot(
        prefix_keys_delta=True, prefix_keys_added=[5], prefix_keys_removed=[1]
    )
    assert shards.prefix_keys_after(delta, before) == {2, 5}
    empty = shard_pb2.LoadSnapshot(prefix_keys_delta=True)
    assert shards.prefix_keys_after(empty, before) is before
    # A snapshot whose only change is its prefix keys is a change, not a heartbeat.
    asyncio.run(asyncio.wait_for(prefix_keys_reach_the_load(), 10))
