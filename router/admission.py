"""Admission: places requests with the policy, or parks them in a bounded FCFS queue.

The queue is served in order whenever the shard table changes (a snapshot, a health change, a
shard joining or leaving): the head is placed if any shard fits it, and nobody overtakes it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

import structlog

from router.config import Policy
from router.metrics import RouterMetrics
from router.policy import Demand
from router.shard_index import ShardIndex
from router.shard_table import ShardTable
from router.shards import Reservation

log = structlog.get_logger("router.admission")

# At most one "no shard is serving" warning per this many seconds from the request path.
_NO_SHARD_WARN_EVERY_S = 10.0


class QueueFull(Exception):
    """No shard fits and the wait queue is at its bound."""

    def __init__(self, queue_size: int, shards: int):
        super().__init__(
            f"no shard has room (all {shards} eligible shards are full) and the router's wait "
            f"queue is full ({queue_size} requests, --queue-size); retry in about a second "
            "with exponential backoff"
        )


class QueueTimeout(Exception):
    """The request waited for room longer than the router allows."""

    def __init__(self, waited_s: float, shards: int):
        self.shards = shards
        what = (
            f"all {shards} eligible shards stayed full"
            if shards
            else "no shard is serving (none healthy with a live load stream)"
        )
        super().__init__(
            f"waited {waited_s:.1f} s for a shard (--queue-timeout-s) but {what}; retry later"
        )


@dataclass(slots=True)
class _Waiter:
    demand: Demand
    placed: asyncio.Future[Reservation]


class Admission:
    """Places requests on shards of a `ShardTable`, FCFS, with at most `queue_size` waiting."""

    def __init__(
        self,
        table: ShardTable,
        policy: Policy,
        residency_first: bool,
        queue_size: int,
        queue_timeout_s: float,
        metrics: RouterMetrics,
    ):
        self._table = table
        self._index = ShardIndex(policy, residency_first)
        table.track(self._index)
        self._queue_size = queue_size
        self._queue_timeout_s = queue_timeout_s
        self._metrics = metrics
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._warned_at = -_NO_SHARD_WARN_EVERY_S
        table.subscribe(self._serve_queue)

    @property
    def depth(self) -> int:
        """Requests waiting now."""
        return sum(not w.placed.done() for w in self._waiters)

    def largest_pool(self) -> int:
        """Tokens the largest whole KV pool among open shards holds (0 while none is known)."""
        self._table.sync()
        return self._index.largest_pool()

    async def place(self, demand: Demand, resumed: bool = False) -> Reservation:
        """Returns the request's reservation on the shard it goes to; the caller releases it.

        A resumed (migrating) request waits at the head of the queue: it was admitted before
        everyone waiting. Raises QueueFull or QueueTimeout.
        """
        if not self._waiters and (reservation := self._try(demand)) is not None:
            return reservation
        if not resumed and self.depth >= self._queue_size:
            raise QueueFull(self._queue_size, len(self._table.serving()))
        self._warn_if_no_shard()
        waiter = _Waiter(demand, asyncio.get_running_loop().create_future())
        if resumed:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        self._metrics.queue_depth.set(self.depth)
        try:
            return await asyncio.wait_for(waiter.placed, self._queue_timeout_s)
        except TimeoutError:
            raise QueueTimeout(self._queue_timeout_s, len(self._table.serving())) from None
        except asyncio.CancelledError:
            # Placed in the same loop turn the caller went away: give the shard its slot back.
            if waiter.placed.done() and not waiter.placed.cancelled():
                waiter.placed.result().release()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            self._metrics.queue_depth.set(self.depth)
            # The head may have left without a shard: let the next one try.
            self._serve_queue()

    def _warn_if_no_shard(self) -> None:
        """A request must wait and no shard serves at all: say so now, not at its timeout."""
        now = time.monotonic()
        if now - self._warned_at < _NO_SHARD_WARN_EVERY_S or self._table.serving():
            return
        self._warned_at = now
        known = self._table.addresses()
        log.warning(
            "no shard is serving: requests wait for one up to --queue-timeout-s",
            queue_timeout_s=self._queue_timeout_s,
            known=len(known),
            shards=known[:10],
        )

    def _try(self, demand: Demand) -> Reservation | None:
        self._table.sync()
        while (address := self._index.place(demand)) is not None:
            handle = self._table.get(address)
            assert handle is not None, f"the index placed on {address}, unknown to the table"
            if handle.eligible():
                return handle.reserve(demand)
            # Stale since the last sweep: take it out now and ask again.
            self._index.update(address, None)
            handle.indexed = False
        return None

    def _serve_queue(self) -> None:
        while self._waiters:
            head = self._waiters[0]
            if head.placed.done():
                self._waiters.popleft()
                continue
            reservation = self._try(head.demand)
            if reservation is None:
                return
            self._waiters.popleft()
            head.placed.set_result(reservation)
