"""Admission: places requests with the policy, or parks them in a bounded FCFS queue.

The queue is served in order whenever the shard table changes (a snapshot, a health change, a
shard joining or leaving): the head is placed if any shard fits it, and nobody overtakes it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from router.config import Policy
from router.metrics import RouterMetrics
from router.policy import Demand
from router.shard_index import ShardIndex
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


class Target(Protocol):
    """A shard as admission sees it (`router.shards.ShardHandle`, or a simulated one)."""

    # The index was last told this shard is eligible.
    indexed: bool

    def eligible(self) -> bool: ...

    def reserve(self, demand: Demand) -> Reservation: ...


class Shards(Protocol):
    """The shards admission places on (`router.shard_table.ShardTable`, or a simulated fleet)."""

    def track(self, index: ShardIndex) -> None: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...

    def sync(self) -> None: ...

    def get(self, address: str) -> Target | None: ...

    def serving(self) -> Sequence[object]: ...

    def addresses(self) -> list[str]: ...


@dataclass(slots=True)
class Waiter:
    """One request in the queue."""

    demand: Demand
    # Takes the request's reservation once placed; returns False when the request went away
    # meanwhile (the reservation is then released).
    on_placed: Callable[[Reservation], bool]


class Admission:
    """Places requests on shards of a `ShardTable`, FCFS, with at most `queue_size` waiting.

    The queue itself is synchronous (`place_now`, `wait`, `withdraw`), so the fleet simulation
    (`benchmarks/fleet_sim.py`) drives this same code in simulated time; `place` is the router's
    asynchronous door to it.
    """

    def __init__(
        self,
        table: Shards,
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
        self._waiters: collections.deque[Waiter] = collections.deque()
        self._warned_at = -_NO_SHARD_WARN_EVERY_S
        table.subscribe(self._serve_queue)

    @property
    def depth(self) -> int:
        """Requests waiting now."""
        return len(self._waiters)

    def largest_pool(self) -> int:
        """Tokens the largest whole KV pool among open shards holds (0 while none is known)."""
        self._table.sync()
        return self._index.largest_pool()

    async def place(self, demand: Demand, resumed: bool = False) -> Reservation:
        """Returns the request's reservation on the shard it goes to; the caller releases it.

        A resumed (migrating) request waits at the head of the queue: it was admitted before
        everyone waiting. Raises QueueFull or QueueTimeout.
        """
        if (reservation := self.place_now(demand)) is not None:
            return reservation
        placed: asyncio.Future[Reservation] = asyncio.get_running_loop().create_future()

        def hand_over(reservation: Reservation) -> bool:
            if placed.done():  # cancelled: the caller went away
                return False
            placed.set_result(reservation)
            return True

        waiter = self.wait(demand, hand_over, resumed)
        try:
            return await asyncio.wait_for(placed, self._queue_timeout_s)
        except TimeoutError:
            raise QueueTimeout(self._queue_timeout_s, len(self._table.serving())) from None
        except asyncio.CancelledError:
            # Placed in the same loop turn the caller went away: give the shard its slot back.
            if placed.done() and not placed.cancelled():
                placed.result().release()
            raise
        finally:
            self.withdraw(waiter)

    def place_now(self, demand: Demand) -> Reservation | None:
        """The request's reservation when nobody waits and a shard fits it now, else None."""
        return None if self._waiters else self._try(demand)

    def wait(
        self, demand: Demand, on_placed: Callable[[Reservation], bool], resumed: bool = False
    ) -> Waiter:
        """Queues a request; `on_placed` gets its reservation once a shard fits it (called in
        the table's change notification). A resumed request goes to the head. Raises QueueFull.
        """
        if not resumed and len(self._waiters) >= self._queue_size:
            raise QueueFull(self._queue_size, len(self._table.serving()))
        self._warn_if_no_shard()
        waiter = Waiter(demand, on_placed)
        if resumed:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        self._metrics.queue_depth.set(len(self._waiters))
        return waiter

    def withdraw(self, waiter: Waiter) -> None:
        """Takes a request out of the queue if it is still there (it timed out or went away)."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self._metrics.queue_depth.set(len(self._waiters))
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
        placed = False
        while self._waiters:
            head = self._waiters[0]
            reservation = self._try(head.demand)
            if reservation is None:
                break
            self._waiters.popleft()
            placed = True
            if not head.on_placed(reservation):
                reservation.release()
        if placed:
            self._metrics.queue_depth.set(len(self._waiters))
