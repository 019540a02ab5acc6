"""WatchLoad's stream: push on change, coalescing, heartbeats, residency deltas."""

from __future__ import annotations

import asyncio
import threading
import time

from protos import shard_pb2
from shard.load_feed import LoadFeed, load_updates


class Shard:
    """A load that tests change by hand."""

    def __init__(self) -> None:
        self.running = 0
        self.resident = ["a"]
        self.snapshots = 0

    def snapshot(self) -> shard_pb2.LoadSnapshot:
        self.snapshots += 1
        return shard_pb2.LoadSnapshot(running=self.running, adapters_resident=self.resident)


async def _collect(stream, into: list[tuple[float, shard_pb2.LoadSnapshot]]) -> None:
    async for message in stream:
        into.append((time.monotonic(), message.snapshot))


async def push_and_coalesce() -> None:
    feed, shard = LoadFeed(), Shard()
    got: list[tuple[float, shard_pb2.LoadSnapshot]] = []
    task = asyncio.create_task(
        _collect(load_updates(feed, shard.snapshot, True, min_gap_s=0.1, heartbeat_s=0.6), got)
    )
    await asyncio.sleep(0.3)
    assert len(got) == 1  # quiet: the first snapshot only, no polling snapshots
    first = got[0][1]
    assert not first.adapters_delta and list(first.adapters_resident) == ["a"]

    # A burst of changes from another thread (the engine's) is one snapshot, sent at once.
    start = time.monotonic()

    def burst() -> None:
        for i in range(1, 6):
            shard.running = i
            feed.changed_threadsafe()

    threading.Thread(target=burst).start()
    while len(got) < 2:
        await asyncio.sleep(0.005)
    assert got[1][0] - start < 0.3  # pushed, not left for the heartbeat (0.5 s away)
    await asyncio.sleep(0.15)
    assert len(got) <= 3 and got[-1][1].running == 5

    # Residency goes out as changes against the stream's previous snapshot.
    shard.resident = ["b", "c"]
    feed.changed()
    await asyncio.sleep(0.15)
    delta = got[-1][1]
    assert delta.adapters_delta and not delta.adapters_resident
    assert (list(delta.adapters_added), list(delta.adapters_removed)) == (["b", "c"], ["a"])

    # Nothing changes: a heartbeat within the interval, with an empty delta.
    count = len(got)
    await asyncio.sleep(0.7)
    assert len(got) == count + 1
    beat = got[-1][1]
    assert beat.adapters_delta and not beat.adapters_added and not beat.adapters_removed
    task.cancel()


async def full_lists_unless_asked() -> None:
    feed, shard = LoadFeed(), Shard()
    got: list[tuple[float, shard_pb2.LoadSnapshot]] = []
    task = asyncio.create_task(_collect(load_updates(feed, shard.snapshot, False, 0.0, 1.0), got))
    await asyncio.sleep(0.05)
    shard.resident = ["b"]
    feed.changed()
    await asyncio.sleep(0.05)
    assert [list(s.adapters_resident) for _, s in got] == [["a"], ["b"]]
    assert not any(s.adapters_delta for _, s in got)
    task.cancel()


def test_changes_are_pushed_coalesced_with_heartbeats_and_residency_deltas():
    asyncio.run(asyncio.wait_for(push_and_coalesce(), 10))


def test_watchers_that_ask_for_no_deltas_get_full_lists():
    asyncio.run(asyncio.wait_for(full_lists_unless_asked(), 10))
