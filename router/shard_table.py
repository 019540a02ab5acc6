"""The shard table: every shard the router knows, by dialed address, kept in step with the
placement index; what each load stream asks of its shard grows with the fleet."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from protos import shard_pb2
from router.metrics import RouterMetrics
from router.policy import ShardLoad
from router.shard_index import ShardIndex
from router.shards import ChannelOptions, ShardHandle

log = structlog.get_logger("router.shard_table")

# How often the table looks for shards whose snapshots went stale, to take them out of the index.
_SWEEP_EVERY_S = 1.0
# What a load stream asks of its shard grows with the fleet, so the router's snapshots a second
# stay bounded (each costs it ~200-300 us of CPU on a busy 2-core VM, mostly gRPC's own): the
# least interval is half a millisecond per shard (at most ~2,000 snapshots/s of urgent changes:
# 50 ms at 100 shards, 500 ms at 1,000; never under the shard's own 20 ms), the heartbeat 4 ms
# per shard (at most ~250 heartbeats/s: 1 s up to 250 shards, 4 s at 1,000, 10 s from 2,500 on).
# A shard sends changes that only refine the ordering after half a heartbeat (`load_feed.Pacing`),
# so at 1,000 shards a busy shard sends a snapshot every 2 s plus its urgent ones.
_MIN_INTERVAL_MS = (20, 1000)
_HEARTBEAT_MS = (1000, 10000)


class ShardTable:
    """All shards the router knows, by dialed address; callbacks fire on every change.

    With an index attached (`track`), every change of a shard's believed load reaches it at the
    next `sync` (placements call it first), and a sweep every second takes out shards whose
    snapshots went stale. A 1,000-shard fleet sends ~1,000 snapshots a second; deferring the
    index work to the placements that read it turns the snapshots a shard sends between two
    placements into one index update.
    """

    def __init__(
        self,
        metrics: RouterMetrics,
        channel_options: ChannelOptions = (),
        prefix_keys: bool = False,
    ):
        """`prefix_keys`: load streams ask their shards for prefix keys (prefix affinity)."""
        self._metrics = metrics
        self._channel_options = channel_options
        self._prefix_keys = prefix_keys
        self._shards: dict[str, ShardHandle] = {}
        self._listeners: list[Callable[[], None]] = []
        self._index: ShardIndex | None = None
        # Shards whose believed load changed since the index last heard of it.
        self._unsynced: dict[str, ShardHandle] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # Counted when scraped (in the exporter's thread), not on every snapshot; that also
        # notices a shard going stale, which changes nothing in the table.
        metrics.shards.set_function(self._eligible_count)
        metrics.shards_idle.set_function(self._idle_count)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Calls `listener` (synchronously, in the event loop) whenever a shard's state changes."""
        self._listeners.append(listener)

    def track(self, index: ShardIndex) -> None:
        """Keeps `index` up to date with every shard's believed load from now on."""
        self._index = index
        for handle in self._shards.values():
            self._reindex(handle)

    def add(self, address: str) -> None:
        """Starts watching a shard; it becomes eligible once SERVING with a first snapshot."""
        if address not in self._shards:
            log.info("shard added", shard=address)
            handle = ShardHandle(
                address,
                self._metrics,
                self._changed,
                self._reindex,
                self._watch_request,
                self._channel_options,
            )
            self._shards[address] = handle
            handle.start()
            if self._sweeper is None:
                self._sweeper = asyncio.create_task(self._sweep(), name="stale sweep")

    async def remove(self, address: str) -> None:
        """Stops placing on a shard; calls already running on it continue."""
        handle = self._shards.pop(address, None)
        if handle is not None:
            log.info("shard removed", shard=address)
            self._unsynced.pop(address, None)
            if self._index is not None:
                self._index.remove(address)
            await handle.close()
            self._notify()

    def addresses(self) -> list[str]:
        """Every known shard, eligible or not, sorted."""
        return sorted(self._shards)

    def get(self, address: str) -> ShardHandle | None:
        """The handle of a known shard."""
        return self._shards.get(address)

    def serving(self) -> list[ShardHandle]:
        """Shards eligible for placement now."""
        return [h for h in self._shards.values() if h.load() is not None]

    def loads(self) -> list[ShardLoad]:
        """Believed loads of the eligible shards."""
        return [load for h in self._shards.values() if (load := h.load()) is not None]

    async def close(self) -> None:
        """Removes every shard."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for address in list(self._shards):
            await self.remove(address)

    def _eligible_count(self) -> int:
        # list() copies the values in one step, safe against the event loop adding a shard.
        return sum(handle.eligible() for handle in list(self._shards.values()))

    def _watch_request(self) -> shard_pb2.WatchLoadRequest:
        """What a load stream asks of its shard: residency (and prefix keys, when placement
        uses them) as deltas, intervals by fleet size."""
        shards = len(self._shards)
        return shard_pb2.WatchLoadRequest(
            residency_deltas=True,
            prefix_keys=self._prefix_keys,
            min_interval_ms=min(_MIN_INTERVAL_MS[1], max(_MIN_INTERVAL_MS[0], shards // 2)),
            heartbeat_ms=min(_HEARTBEAT_MS[1], max(_HEARTBEAT_MS[0], shards * 4)),
        )

    def _idle_count(self) -> int:
        return sum(handle.idle_seconds() > 0 for handle in list(self._shards.values()))

    def sync(self) -> None:
        """Brings the index up to date with every shard's believed load (call before placing)."""
        if not self._unsynced or self._index is None:
            return
        unsynced, self._unsynced = self._unsynced, {}
        for address, handle in unsynced.items():
            load = handle.load()
            handle.indexed = load is not None
            self._index.update(address, load)

    def _reindex(self, handle: ShardHandle) -> None:
        if self._index is not None and handle.address in self._shards:
            self._unsynced[handle.address] = handle

    def _changed(self, handle: ShardHandle) -> None:
        self._reindex(handle)
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    async def _sweep(self) -> None:
        """Takes shards whose snapshots went stale out of the index (O(shards) a second)."""
        while True:
            await asyncio.sleep(_SWEEP_EVERY_S)
            stale = [h for h in self._shards.values() if h.indexed and not h.eligible()]
            for handle in stale:
                # A shard leaving placement cannot make a waiting request placeable: no event.
                self._reindex(handle)
