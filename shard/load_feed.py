"""WatchLoad's stream: snapshots pushed on change, coalesced, with residency sent as changes.

The engine thread says "the load changed" (`LoadFeed.changed_threadsafe`); every watcher then
sends one snapshot, no sooner than `min_gap_s` after its previous one, so a burst of changes
becomes one message, and at least every `heartbeat_s` so the router knows the shard is alive.
A quiet shard costs one wake-up per watcher a second instead of fifty.

A watcher that asks for residency deltas (`WatchLoadRequest.residency_deltas`) gets the full
adapter list once, then only the adapters loaded and evicted since its previous snapshot.

Torch-free: the tests' fake shard and the fleet benchmarks' simulated shards stream through it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

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


def intervals(request: shard_pb2.WatchLoadRequest) -> tuple[float, float]:
    """(least, most) seconds between two snapshots of the stream `request` opens."""
    heartbeat = HEARTBEAT_S
    if request.heartbeat_ms:
        heartbeat = min(max(request.heartbeat_ms / 1000, HEARTBEAT_S), MAX_HEARTBEAT_S)
    gap = MIN_GAP_S if not request.min_interval_ms else request.min_interval_ms / 1000
    return min(gap, heartbeat), heartbeat


async def load_updates(
    feed: LoadFeed,
    snapshot: Callable[[], shard_pb2.LoadSnapshot],
    deltas: bool,
    min_gap_s: float = MIN_GAP_S,
    heartbeat_s: float = HEARTBEAT_S,
) -> AsyncIterator[shard_pb2.WatchLoadResponse]:
    """One watcher's stream: a snapshot now, then on change (coalesced) and every heartbeat."""
    residency = ResidencySender(deltas)
    while True:
        seen = feed.version
        message = snapshot()
        residency.fill(message)
        yield shard_pb2.WatchLoadResponse(snapshot=message)
        await asyncio.sleep(min_gap_s)
        await feed.wait_past(seen, heartbeat_s - min_gap_s)
