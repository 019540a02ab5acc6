"""One shard as the router sees it: one channel, one WatchLoad stream and one health watch.

A shard is eligible for placement while its health says SERVING and its load stream delivers
fresh snapshots. The router adds what it dispatched to the last snapshot (optimistic accounting),
so a burst is spread by the policy instead of landing on one shard. Each dispatched request counts
until the first snapshot received after the shard answered it (its first message: the shard has
admitted it, so that snapshot includes it), until its call ends, or until a snapshot shows the
shard's batch plus queue grown by as many requests (oldest reservations first), whichever comes
first. Snapshots race dispatches and answers (they come on another stream, at most every 20 ms):
trusting the next snapshot alone would forget requests still in flight, and dropping a request at
its first message would forget it until a snapshot shows it, so that a burst on a slow machine
could land one request too many on a shard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from router.metrics import RouterMetrics
from router.policy import Demand, ShardLoad, statefulset_ordinal

log = structlog.get_logger("router.shards")

Message = TypeVar("Message")

ChannelOptions = tuple[tuple[str, int], ...]
# A load stream silent for this many of its heartbeats means a hung or cut-off shard.
STALE_AFTER_HEARTBEATS = 5.0
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 2.0


def load_from_proto(
    snapshot: shard_pb2.LoadSnapshot,
    shard: str,
    resident: frozenset[str],
    ordinal: int | None,
    prefix_keys: frozenset[int] = frozenset(),
) -> ShardLoad:
    """Converts a protobuf snapshot to the policy's value type, keyed by the dialed address;
    `resident` and `prefix_keys` are the residency and prefix keys it describes (see
    `residency_after` and `prefix_keys_after`), `ordinal` the shard's StatefulSet ordinal
    (`statefulset_ordinal` of its shard id, else of its address)."""
    return ShardLoad(
        shard=shard,
        running=snapshot.running,
        max_batch_size=snapshot.max_batch_size,
        kv_pages_free=snapshot.kv_pages_free,
        kv_pages_total=snapshot.kv_pages_total,
        kv_page_size=snapshot.kv_page_size,
        queued=snapshot.queued,
        kv_pages_queued=snapshot.kv_pages_queued,
        adapters_resident=resident,
        draining=snapshot.draining,
        ordinal=ordinal,
        prefix_keys=prefix_keys,
    )


def residency_after(snapshot: shard_pb2.LoadSnapshot, before: frozenset[str]) -> frozenset[str]:
    """The adapters resident after `snapshot`, given those resident before it.

    Returns `before` itself when nothing changed, so the placement index skips its residency sets.
    """
    if snapshot.adapters_delta:
        if not snapshot.adapters_added and not snapshot.adapters_removed:
            return before
        return (before - frozenset(snapshot.adapters_removed)) | frozenset(snapshot.adapters_added)
    resident = frozenset(snapshot.adapters_resident)
    return before if resident == before else resident


def prefix_keys_after(snapshot: shard_pb2.LoadSnapshot, before: frozenset[int]) -> frozenset[int]:
    """The prefix keys a shard holds after `snapshot`, given those it held before; `before`
    itself when nothing changed (the placement index then skips its key sets)."""
    if snapshot.prefix_keys_delta:
        if not snapshot.prefix_keys_added and not snapshot.prefix_keys_removed:
            return before
        return (before - frozenset(snapshot.prefix_keys_removed)) | frozenset(
            snapshot.prefix_keys_added
        )
    keys = frozenset(snapshot.prefix_keys)
    return before if keys == before else keys


class Reservation:
    """One dispatched request counted on a shard's believed load; release() is idempotent."""

    __slots__ = ("handle",)

    def __init__(self, handle: ShardHandle):
        self.handle = handle

    def answered(self) -> None:
        """The shard sent its first message: its next snapshot includes the request."""
        self.handle.answered(self)

    def release(self) -> None:
        """The call ended: the shard's snapshots take over."""
        self.handle.release(self)


class ShardHandle:
    """One shard: its channel and stubs, its health, and the load the router believes it has."""

    def __init__(
        self,
        address: str,
        metrics: RouterMetrics,
        on_change: Callable[[ShardHandle], None],
        on_load: Callable[[ShardHandle], None],
        watch_request: Callable[[], shard_pb2.WatchLoadRequest],
        channel_options: ChannelOptions = (),
    ):
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=channel_options)
        self.shard = shard_pb2_grpc.ShardStub(self.channel)
        self.generator = generate_pb2_grpc.GeneratorStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._metrics = metrics
        # Per-shard gauges are read when scraped, not set per snapshot: a fleet of 1,000 shards
        # sends ~1,000 snapshots a second, and each set takes the metric's lock.
        self._running_seen = 0
        self._pages_used_seen = 0
        metrics.shard_running.labels(address).set_function(lambda: self._running_seen)
        metrics.shard_kv_pages_used.labels(address).set_function(lambda: self._pages_used_seen)
        metrics.shard_idle_seconds.labels(address).set_function(self.idle_seconds)
        # time.monotonic() since when the shard has had nothing to do, per its snapshots.
        self._idle_since: float | None = None
        self._on_change = on_change
        # Tells the placement index the believed load changed (no listeners: placing reserves).
        self._on_load = on_load
        self._watch_request = watch_request
        # The index was last told this shard is eligible (the stale sweep checks it).
        self.indexed = False
        self._serving = False
        self._load: ShardLoad | None = None
        self._resident: frozenset[str] = frozenset()
        self._prefix_keys: frozenset[int] = frozenset()
        # The StatefulSet ordinal, parsed once per shard id the shard reports.
        self._shard_id: str | None = None
        self._ordinal: int | None = None
        # The load fields of the last snapshot, to pass over heartbeats cheaply.
        self._last_fields: tuple[object, ...] = ()
        self._pending: dict[Reservation, int] = {}
        self._answered: set[Reservation] = set()  # pending, and admitted by the shard
        self._received_at = 0.0
        self._heartbeat_s = 1.0  # as the load stream asked its shard
        self._active_calls = 0
        self._removed = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Starts the load and health watches (reconnecting with backoff until closed)."""
        health = health_pb2.HealthCheckRequest(service="")
        watches = {
            "load stream": (
                self._open_load_stream,
                self._accept,
                self._load_lost,
            ),
            "health watch": (
                lambda: self._health.Watch(health),
                self._health_said,
                lambda: self._set_serving(False),
            ),
        }
        self._tasks = [
            asyncio.create_task(self._keep_watching(what, *watch), name=f"{what} {self.address}")
            for what, watch in watches.items()
        ]

    def eligible(self) -> bool:
        """SERVING, with a fresh snapshot, and still in the table."""
        return (
            not self._removed
            and self._serving
            and self._load is not None
            and time.monotonic() - self._received_at <= STALE_AFTER_HEARTBEATS * self._heartbeat_s
        )

    def idle_seconds(self) -> float:
        """Seconds the shard has had nothing running, queued or dispatched; 0 if not eligible.

        Read by the metrics exporter's thread: a torn read costs one scrape's accuracy.
        """
        since = self._idle_since
        if since is None or self._pending or not self.eligible():
            return 0.0
        return max(0.0, time.monotonic() - since)

    def load(self) -> ShardLoad | None:
        """The believed load, or None while the shard is not eligible for placement."""
        load = self._load
        if load is None or not self.eligible():
            return None
        if not self._pending:
            return load
        return dataclasses.replace(
            load,
            running=load.running + len(self._pending),
            kv_pages_free=max(0, load.kv_pages_free - sum(self._pending.values())),
        )

    def holds_prefix(self, prefix_key: int) -> bool:
        """The shard's last snapshot reported that prefix key."""
        return prefix_key in self._prefix_keys

    def reserve(self, demand: Demand) -> Reservation:
        """Counts a dispatched request on this shard until the reservation is released."""
        page_size = self._load.kv_page_size if self._load is not None else 1
        reservation = Reservation(self)
        self._pending[reservation] = demand.pages(page_size)
        self._on_load(self)
        return reservation

    def answered(self, reservation: Reservation) -> None:
        """The shard admitted a dispatched request: it counts until the next snapshot."""
        if reservation in self._pending:
            self._answered.add(reservation)

    def release(self, reservation: Reservation) -> None:
        """Stops counting a dispatched request (the shard now reports it itself)."""
        self._answered.discard(reservation)
        if self._pending.pop(reservation, None) is not None:
            self._on_change(self)

    def mark_failed(self) -> None:
        """A call failed as if the shard were gone: no placements until it sends a snapshot."""
        self._load = None
        self._on_change(self)

    def mark_full(self) -> None:
        """The shard just ran out of KV pages: no placements needing pages until it says more."""
        if self._load is not None:
            self._load = dataclasses.replace(self._load, kv_pages_free=0)
            self._overridden()

    def mark_draining(self) -> None:
        """The shard said it drains: no placements, whatever a stale snapshot says."""
        if self._load is not None:
            self._load = dataclasses.replace(self._load, draining=True)
            self._overridden()

    def _overridden(self) -> None:
        """The load was changed here, not by the shard: its next snapshot replaces it, even a
        heartbeat that repeats the last one (a shard whose load did not move would otherwise
        stay marked full or draining for good)."""
        self._last_fields = ()
        self._on_load(self)

    @contextmanager
    def call(self) -> Iterator[None]:
        """Scope of one proxied call; a removed shard's channel closes after its last call."""
        self._active_calls += 1
        try:
            yield
        finally:
            self._active_calls -= 1
            if self._removed and self._active_calls == 0:
                asyncio.get_running_loop().create_task(self.channel.close())

    async def close(self) -> None:
        """Leaves the table: stops the watches; the channel closes once no call uses it."""
        self._removed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._metrics.forget_shard(self.address)
        if self._active_calls == 0:
            await self.channel.close()

    async def _keep_watching(
        self,
        what: str,
        open_stream: Callable[[], AsyncIterable[Message]],
        on_message: Callable[[Message], None],
        on_lost: Callable[[], None],
    ) -> None:
        """Follows one server stream of the shard, reopening it with backoff until cancelled."""
        backoff = _BACKOFF_FIRST_S
        while True:
            try:
                async for message in open_stream():
                    backoff = _BACKOFF_FIRST_S
                    on_message(message)
                log.info(f"{what} ended", shard=self.address)
            except grpc.aio.AioRpcError as err:
                log.info(
                    f"{what} failed",
                    shard=self.address,
                    code=err.code().name,
                    details=err.details(),
                )
            on_lost()
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, _BACKOFF_MAX_S)

    def _open_load_stream(self) -> AsyncIterable[shard_pb2.WatchLoadResponse]:
        request = self._watch_request()
        self._heartbeat_s = max(1000, request.heartbeat_ms) / 1000
        return self.shard.WatchLoad(request)

    def _accept(self, message: shard_pb2.WatchLoadResponse) -> None:
        snapshot = message.snapshot
        first = self._load is None
        resident = residency_after(snapshot, self._resident)
        prefix_keys = prefix_keys_after(snapshot, self._prefix_keys)
        fields = (
            snapshot.running,
            snapshot.queued,
            snapshot.kv_pages_free,
            snapshot.kv_pages_queued,
            snapshot.draining,
            snapshot.max_batch_size,
            snapshot.kv_pages_total,
            snapshot.kv_page_size,
            snapshot.shard_id,
        )
        unchanged = (
            resident is self._resident
            and prefix_keys is self._prefix_keys
            and fields == self._last_fields
        )
        if unchanged and not first and not self._answered:
            # A heartbeat: no growth to settle, nothing for the index or the gauges.
            self._received_at = time.monotonic()
            if snapshot.idle_s:
                self._idle_since = self._received_at - snapshot.idle_s
            return
        self._last_fields = fields
        self._resident = resident
        self._prefix_keys = prefix_keys
        if snapshot.shard_id != self._shard_id:
            self._shard_id = snapshot.shard_id
            self._ordinal = statefulset_ordinal(snapshot.shard_id or self.address)
        load = load_from_proto(snapshot, self.address, resident, self._ordinal, prefix_keys)
        grown = load.occupancy - (self._load.occupancy if self._load is not None else 0)
        # Answered requests are in this snapshot and account for part of its growth; the rest
        # of the growth takes over the oldest reservations.
        for reservation in self._answered:
            del self._pending[reservation]
        grown -= len(self._answered)
        self._answered.clear()
        for reservation in list(self._pending)[: max(0, grown)]:
            del self._pending[reservation]
        self._load = load
        self._received_at = time.monotonic()
        idle = load.occupancy == 0
        if not idle:
            self._idle_since = None
        elif self._idle_since is None or snapshot.idle_s:
            self._idle_since = self._received_at - snapshot.idle_s
        self._running_seen = snapshot.running
        self._pages_used_seen = snapshot.kv_pages_total - snapshot.kv_pages_free
        if first:
            log.info("load stream live", shard=self.address, shard_id=snapshot.shard_id)
        self._on_change(self)

    def _load_lost(self) -> None:
        if self._load is not None:
            self._load = None
            self._on_change(self)

    def _health_said(self, message: health_pb2.HealthCheckResponse) -> None:
        self._set_serving(message.status == health_pb2.HealthCheckResponse.SERVING)

    def _set_serving(self, serving: bool) -> None:
        if serving != self._serving:
            self._serving = serving
            log.info("health changed", shard=self.address, serving=serving)
            self._on_change(self)
