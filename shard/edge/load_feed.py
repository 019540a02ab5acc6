"""WatchLoad's stream: snapshots pushed on change, coalesced, with residency sent as changes.

The engine thread says "the load changed" (`LoadFeed.changed_threadsafe`); every watcher then
sends one snapshot, no sooner than `min_gap_s` after its previous one, so a burst of changes
becomes one message, and at least every `heartbeat_s` so the router knows the shard is alive.
A quiet shard costs one wake-up per watcher a second instead of fifty.

A watcher that asks for residency deltas (`WatchLoadRequest.residency_deltas`) gets the full
adapter list once, then only the adapters loaded and evicted since its previous snapshot. One
that asks for prefix keys (`WatchLoadRequest.prefix_keys`) gets them the same way: in full, or
in full once and then as changes.

Torch-free: the tests' fake shard and the fleet benchmarks' simulated shards stream through it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from protos import shard_pb2

# A change is pushed at once after a quiet spell; later ones within this gap ride together.
MIN_GAP_S = 0.02
# Contract (protos/shard.proto): a snapshot at least every second, changed or not, unless the
# watcher asks for a longer heartbeat (up to MAX_HEARTBEAT_S).
HEARTBEAT_S = 1.0
MAX_HEARTBEAT_S = 10.0


class LoadFeed:
    """A version counter that watchers wait on; bumped from the event loop or any thread.

    It learns its event loop from its first watcher: before that, nobody needs waking.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self.version = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._wake_pending = False

    def changed(self) -> None:
        """The load changed (call in the event loop)."""
        self._wake_pending = False
        self.version += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def changed_threadsafe(self) -> None:
        """The load changed (call from any thread); wake-ups already pending are not repeated."""
        if self._loop is None or self._wake_pending:
            return
        self._wake_pending = True
        # RuntimeError: the server's loop has closed (shutdown), nobody is left to wake.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.changed)

    async def wait_past(self, seen: int, timeout: float) -> None:
        """Returns once the version is past `seen`, or after `timeout` seconds."""
        self._loop = loop = asyncio.get_running_loop()
        if self.version != seen or timeout <= 0:
            return
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


class ResidencySender:
    """Per watcher: rewrites a snapshot's full adapter list as changes against the last one."""

    def __init__(self, deltas: bool):
        self._deltas = deltas
        self._sent: frozenset[str] | None = None

    def fill(self, snapshot: shard_pb2.LoadSnapshot) -> None:
        resident = frozenset(snapshot.adapters_resident)
        previous, self._sent = self._sent, resident
        if not self._deltas or previous is None:
            return
        del snapshot.adapters_resident[:]
        snapshot.adapters_delta = True
        snapshot.adapters_added.extend(sorted(resident - previous))
        snapshot.adapters_removed.extend(sorted(previous - resident))


class PrefixKeySender:
    """Per watcher that asked for prefix keys: all of them, or changes against the last sent."""

    def __init__(self, deltas: bool):
        self._deltas = deltas
        self._sent: frozenset[int] | None = None

    def fill(self, snapshot: shard_pb2.LoadSnapshot, keys: frozenset[int]) -> None:
        previous, self._sent = self._sent, keys
        if not self._deltas or previous is None:
            snapshot.prefix_keys.extend(keys)
            return
        snapshot.prefix_keys_delta = True
        if keys is not previous:  # the shard rebuilds its set only when it changes
            snapshot.prefix_keys_added.extend(keys - previous)
            snapshot.prefix_keys_removed.extend(previous - keys)


@dataclass(frozen=True, slots=True)
class Pacing:
    """When one watcher gets snapshots."""

    # Least seconds between two snapshots: changes within it ride together.
    min_gap_s: float = MIN_GAP_S
    # Changes that matter little to placement (see `urgent`) wait this long after the last
    # snapshot, so a busy shard whose KV pages grow every step is not a snapshot every step.
    settle_s: float = HEARTBEAT_S / 2
    # Most seconds between two snapshots, changed or not.
    heartbeat_s: float = HEARTBEAT_S


# Every change at once: the tests' fake shard, whose router tests watch each step.
EVERY_CHANGE = Pacing(0.0, 0.0, HEARTBEAT_S)


def pacing(request: shard_pb2.WatchLoadRequest) -> Pacing:
    """The pacing a WatchLoadRequest asks for (protos/shard.proto), within the shard's bounds."""
    heartbeat = HEARTBEAT_S
    if request.heartbeat_ms:
        heartbeat = min(max(request.heartbeat_ms / 1000, HEARTBEAT_S), MAX_HEARTBEAT_S)
    gap = MIN_GAP_S if not request.min_interval_ms else request.min_interval_ms / 1000
    gap = min(gap, heartbeat)
    return Pacing(gap, max(gap, heartbeat / 2), heartbeat)


def urgent(sent: shard_pb2.LoadSnapshot, now: shard_pb2.LoadSnapshot) -> bool:
    """A change the router must see at once.

    The shard starts or stops draining, its limits change, its batch empties or fills (or
    stops being either), or the KV room not promised to queued requests moves by a sixteenth of
    the pool. Other changes (a batch of 12 becoming 13, a page more in use, residency) only
    refine the router's ordering and wait for `Pacing.settle_s`.
    """
    if (now.draining, now.max_batch_size, now.kv_pages_total, now.kv_page_size) != (
        sent.draining,
        sent.max_batch_size,
        sent.kv_pages_total,
        sent.kv_page_size,
    ):
        return True
    before, after = sent.running + sent.queued, now.running + now.queued
    if (before == 0) != (after == 0) or (before >= sent.max_batch_size) != (
        after >= now.max_batch_size
    ):
        return True
    room_before = max(0, sent.kv_pages_free - sent.kv_pages_queued)
    room_after = max(0, now.kv_pages_free - now.kv_pages_queued)
    return abs(room_after - room_before) * 16 >= max(1, now.kv_pages_total)


async def load_updates(
    feed: LoadFeed,
    snapshot: Callable[[], shard_pb2.LoadSnapshot],
    deltas: bool,
    pace: Pacing = Pacing(),
    prefix_keys: Callable[[], frozenset[int]] | None = None,
) -> AsyncIterator[shard_pb2.WatchLoadResponse]:
    """One watcher's stream: a snapshot now, then on change (paced) and every heartbeat;
    with `prefix_keys` (the keys the shard holds now), its snapshots carry them."""
    residency = ResidencySender(deltas)
    keys = PrefixKeySender(deltas) if prefix_keys is not None else None
    clock = asyncio.get_running_loop().time
    seen = feed.version
    message = snapshot()
    while True:
        sent = shard_pb2.LoadSnapshot()
        sent.CopyFrom(message)
        residency.fill(message)
        if keys is not None and prefix_keys is not None:
            keys.fill(message, prefix_keys())
        sent_at = clock()
        yield shard_pb2.WatchLoadResponse(snapshot=message)
        await asyncio.sleep(pace.min_gap_s)
        while True:
            now = clock()
            beat_at = sent_at + pace.heartbeat_s
            if feed.version == seen:  # nothing changed since the sent snapshot
                if now >= beat_at:
                    seen = feed.version
                    message = snapshot()
                    break
                await feed.wait_past(seen, beat_at - now)
                continue
            version = feed.version  # read before the snapshot: a later change is not lost
            current = snapshot()
            settle_at = sent_at + pace.settle_s
            if now >= settle_at or now >= beat_at or urgent(sent, current):
                seen, message = version, current
                break
            await feed.wait_past(version, min(settle_at, beat_at) - now)
