"""WatchLoad's stream: push on change, pacing by urgency, heartbeats, residency deltas."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from protos import shard_pb2
from shard.compose import build_engine
from shard.config import parse_config
from shard.edge.load_feed import LoadFeed, Pacing, load_updates, pacing, urgent
from shard.parallel.group import SINGLE
from tests.test_engine import Collector, request


class Shard:
    """A load that tests change by hand."""

    def __init__(self) -> None:
        self.running = 0
        self.free = 100
        self.resident = ["a"]

    def snapshot(self) -> shard_pb2.LoadSnapshot:
        return shard_pb2.LoadSnapshot(
            running=self.running,
            max_batch_size=8,
            kv_pages_free=self.free,
            kv_pages_total=160,
            kv_page_size=16,
            adapters_resident=self.resident,
        )


async def _collect(stream, into: list[tuple[float, shard_pb2.LoadSnapshot]]) -> None:
    async for message in stream:
        into.append((time.monotonic(), message.snapshot))


async def _until(got: list, count: int, timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while len(got) < count:
        assert time.monotonic() - start < timeout_s, f"no snapshot {count}"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def paced_stream() -> None:
    feed, shard = LoadFeed(), Shard()
    got: list[tuple[float, shard_pb2.LoadSnapshot]] = []
    pace = Pacing(min_gap_s=0.1, settle_s=0.5, heartbeat_s=1.2)
    task = asyncio.create_task(_collect(load_updates(feed, shard.snapshot, True, pace), got))
    await asyncio.sleep(0.3)
    assert len(got) == 1  # quiet: the first snapshot only, no polling snapshots
    first = got[0][1]
    assert not first.adapters_delta and list(first.adapters_resident) == ["a"]

    # The batch stops being empty (urgent), in a burst from another thread (the engine's): one
    # snapshot, pushed at once, then at most one more for the rest of the burst.
    def burst() -> None:
        for i in range(1, 6):
            shard.running = i
            feed.changed_threadsafe()

    threading.Thread(target=burst).start()
    assert await _until(got, 2) < 0.3  # pushed, not left for the heartbeat (1.2 s away)
    assert got[1][1].running >= 1
    # Whatever of the burst came after that push is mid-batch: it follows within settle_s.
    while got[-1][1].running != 5:
        await _until(got, len(got) + 1, timeout_s=1.0)
    assert len(got) <= 3

    # 5 -> 6 of 8 and a page more in use: it waits for settle_s after the last snapshot (sent at
    # most 0.25 s ago, so not within the next 0.1 s).
    count, sent_at = len(got), got[-1][0]
    shard.running, shard.free = 6, 99
    feed.changed()
    await asyncio.sleep(0.1)
    assert len(got) == count
    await _until(got, count + 1)
    assert got[-1][1].running == 6 and got[-1][0] - sent_at >= 0.45

    # The batch fills (urgent) as the residency changes: at once, residency as changes.
    await asyncio.sleep(0.15)
    count = len(got)
    shard.running, shard.resident = 8, ["b", "c"]
    feed.changed()
    assert await _until(got, count + 1) < 0.3
    delta = got[-1][1]
    assert delta.running == 8 and delta.adapters_delta and not delta.adapters_resident
    assert (list(delta.adapters_added), list(delta.adapters_removed)) == (["b", "c"], ["a"])

    # Nothing changes: a heartbeat, with an empty delta.
    count = len(got)
    assert 0.9 < await _until(got, count + 1) < 2.0
    beat = got[-1][1]
    assert beat.adapters_delta and not beat.adapters_added and not beat.adapters_removed
    task.cancel()


async def full_lists_unless_asked() -> None:
    feed, shard = LoadFeed(), Shard()
    got: list[tuple[float, shard_pb2.LoadSnapshot]] = []
    pace = Pacing(0.0, 0.0, 1.0)
    task = asyncio.create_task(_collect(load_updates(feed, shard.snapshot, False, pace), got))
    await asyncio.sleep(0.05)
    shard.resident = ["b"]
    feed.changed()
    await asyncio.sleep(0.05)
    assert [list(s.adapters_resident) for _, s in got] == [["a"], ["b"]]
    assert not any(s.adapters_delta for _, s in got)
    task.cancel()


def test_changes_are_paced_by_urgency_with_heartbeats_and_residency_deltas():
    asyncio.run(asyncio.wait_for(paced_stream(), 20))


def test_watchers_that_ask_for_no_deltas_get_full_lists():
    asyncio.run(asyncio.wait_for(full_lists_unless_asked(), 10))


def _snap(running: int, queued: int = 0, free: int = 100, **kw) -> shard_pb2.LoadSnapshot:
    return shard_pb2.LoadSnapshot(
        running=running, queued=queued, max_batch_size=8, kv_pages_free=free,
        kv_pages_total=160, kv_page_size=16, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (_snap(3), _snap(4), False),  # mid-batch
        (_snap(3, free=100), _snap(3, free=91), False),  # KV moved less than 1/16 of 160
        (_snap(3, free=100), _snap(3, free=90), True),
        (_snap(0), _snap(1), True),  # no longer idle
        (_snap(1), _snap(0), True),  # idle
        (_snap(7), _snap(8), True),  # full
        (_snap(5, queued=3), _snap(5, queued=2), True),  # no longer full (queue counts)
        (_snap(3), _snap(3, draining=True), True),
    ],
)
def test_urgent_changes(before, after, expected):
    assert urgent(before, after) is expected


def test_pacing_from_the_request():
    assert pacing(shard_pb2.WatchLoadRequest()) == Pacing(0.02, 0.5, 1.0)
    asked = pacing(shard_pb2.WatchLoadRequest(min_interval_ms=250, heartbeat_ms=2000))
    assert asked == Pacing(0.25, 1.0, 2.0)
    # Bounds: the heartbeat within 1..10 s, the gap never past the heartbeat.
    assert pacing(shard_pb2.WatchLoadRequest(heartbeat_ms=50)).heartbeat_s == 1.0
    assert pacing(shard_pb2.WatchLoadRequest(min_interval_ms=99_000, heartbeat_ms=99_000)) == (
        Pacing(10.0, 10.0, 10.0)
    )


async def prefix_keys_as_asked() -> None:
    feed, shard = LoadFeed(), Shard()
    keys = frozenset({1, 2})
    streams: dict[str, list[tuple[float, shard_pb2.LoadSnapshot]]] = {}
    tasks = []
    for name, deltas, asked in (
        ("deltas", True, True),
        ("full", False, True),
        ("none", True, False),
    ):
        got = streams[name] = []
        stream = load_updates(
            feed, shard.snapshot, deltas, Pacing(0.0, 0.0, 5.0), (lambda: keys) if asked else None
        )
        tasks.append(asyncio.create_task(_collect(stream, got)))
    for count in (1, 2, 3):
        for got in streams.values():
            await _until(got, count)
        if count == 1:
            keys = frozenset({2, 3})
        else:
            shard.running = 1  # a change with the same keys (the same set object)
        feed.changed()
    first, changed, same = (s for _, s in streams["deltas"][:3])
    assert sorted(first.prefix_keys) == [1, 2] and not first.prefix_keys_delta
    assert changed.prefix_keys_delta and not changed.prefix_keys
    assert (list(changed.prefix_keys_added), list(changed.prefix_keys_removed)) == ([3], [1])
    assert same.prefix_keys_delta and not same.prefix_keys_added and not same.prefix_keys_removed
    assert [sorted(s.prefix_keys) for _, s in streams["full"][:3]] == [[1, 2], [2, 3], [2, 3]]
    assert not any(s.prefix_keys or s.prefix_keys_delta for _, s in streams["none"])
    for task in tasks:
        task.cancel()


def test_prefix_keys_only_for_watchers_that_ask_as_changes_with_deltas():
    asyncio.run(asyncio.wait_for(prefix_keys_as_asked(), 10))


def test_a_built_shards_engine_wakes_its_watchers_on_a_load_change(tiny) -> None:
    """The composition root gives the engine the service's feed when it is made: a request
    submitted to the engine wakes a WatchLoad watcher (which would otherwise wait it out)."""
    argv = ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir)]
    engine, service, _ = build_engine(parse_config([*argv, "--device", "cpu"], env={}), SINGLE)
    feed = service.load_feed
    engine.start()

    async def watch() -> int:
        seen = feed.version
        waiting = asyncio.ensure_future(feed.wait_past(seen, 5.0))
        await asyncio.sleep(0)  # the feed learns its event loop from its first watcher
        engine.submit(request("r", "", [5, 6, 7], new=2), Collector())
        await waiting
        return feed.version - seen

    try:
        assert asyncio.run(watch()) > 0
    finally:
        engine.stop()
