"""Admission's queue, driven synchronously over a table of in-memory shards (no gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from router.admission import Admission, QueueFull
from router.config import Policy
from router.metrics import RouterMetrics
from router.policy import Demand, ShardLoad
from router.shard_index import ShardIndex
from router.shards import Reservation


class _Shard:
    """One shard with `slots` batch slots; a reservation takes one until released."""

    def __init__(self, table: _Table, name: str, slots: int):
        self.table, self.name, self.slots, self.taken = table, name, slots, 0
        self.indexed = True

    def load(self) -> ShardLoad:
        return ShardLoad(self.name, self.taken, self.slots, 100, 100, 16)

    def eligible(self) -> bool:
        return True

    def reserve(self, demand: Demand) -> Reservation:
        self.taken += 1
        self.table.index.update(self.name, self.load())
        return Reservation(self)  # type: ignore[arg-type]

    def answered(self, reservation: Reservation) -> None:
        pass

    def release(self, reservation: Reservation) -> None:
        self.taken -= 1
        self.table.changed(self)


class _Table:
    def __init__(self, slots: dict[str, int]):
        self.shards = {name: _Shard(self, name, n) for name, n in slots.items()}
        self.listeners: list[Callable[[], None]] = []
        self.index: ShardIndex

    def track(self, index: ShardIndex) -> None:
        self.index = index
        for shard in self.shards.values():
            index.update(shard.name, shard.load())

    def subscribe(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def sync(self) -> None:
        pass

    def get(self, address: str) -> _Shard | None:
        return self.shards.get(address)

    def serving(self) -> list[_Shard]:
        return list(self.shards.values())

    def addresses(self) -> list[str]:
        return sorted(self.shards)

    def changed(self, shard: _Shard) -> None:
        self.index.update(shard.name, shard.load())
        for listener in self.listeners:
            listener()


def _admission(slots: dict[str, int], queue_size: int = 8) -> Admission:
    return Admission(_Table(slots), Policy.CONSOLIDATE, False, queue_size, 5.0, RouterMetrics())


def test_waiters_are_served_in_order_and_a_resumed_request_first() -> None:
    admission = _admission({"s0": 1})
    first = admission.place_now(Demand("a", 10))
    assert first is not None and admission.place_now(Demand("a", 10)) is None
    served: list[str] = []

    def take(name: str) -> Callable[[Reservation], bool]:
        return lambda reservation: served.append(name) or True

    for name in ("w1", "w2"):
        admission.wait(Demand("a", 10), take(name))
    admission.wait(Demand("a", 10), take("resumed"), resumed=True)
    # Nobody overtakes the queue: a new request with a free slot still waits behind it.
    assert admission.depth == 3
    first.release()
    assert served == ["resumed"] and admission.depth == 2


def test_the_queue_bound_refuses_new_requests_but_not_resumed_ones() -> None:
    admission = _admission({"s0": 1}, queue_size=2)
    assert admission.place_now(Demand("a", 10)) is not None
    admission.wait(Demand("a", 10), lambda r: True)
    admission.wait(Demand("a", 10), lambda r: True)
    with pytest.raises(QueueFull, match="--queue-size"):
        admission.wait(Demand("a", 10), lambda r: True)
    admission.wait(Demand("a", 10), lambda r: True, resumed=True)
    assert admission.depth == 3


def test_a_waiter_gone_meanwhile_gives_its_slot_to_the_next() -> None:
    admission = _admission({"s0": 1})
    held = admission.place_now(Demand("a", 10))
    assert held is not None
    got: list[Reservation] = []
    admission.wait(Demand("a", 10), lambda r: False)  # went away: its reservation is released
    admission.wait(Demand("a", 10), lambda r: got.append(r) or True)
    held.release()
    assert len(got) == 1 and admission.depth == 0


def test_withdrawing_a_head_that_fits_nowhere_lets_the_next_one_place() -> None:
    admission = _admission({"s0": 2})
    assert admission.place_now(Demand("a", 10)) is not None
    got: list[Reservation] = []
    # 5,000 tokens need 313 pages of 16: more than the busy shard's 100 free.
    head = admission.wait(Demand("a", 5000), lambda r: True)
    admission.wait(Demand("a", 10), lambda r: got.append(r) or True)
    assert not got  # FCFS: the small request does not overtake the head
    admission.withdraw(head)
    assert len(got) == 1 and admission.depth == 0
    admission.withdraw(head)  # gone already: nothing happens


def test_place_waits_for_room_and_times_out_with_an_actionable_error() -> None:
    async def scenario() -> None:
        admission = _admission({"s0": 1})
        held = admission.place_now(Demand("a", 10))
        assert held is not None
        waiting = asyncio.create_task(admission.place(Demand("a", 10)))
        await asyncio.sleep(0)
        assert admission.depth == 1
        held.release()
        reservation = await asyncio.wait_for(waiting, 1)
        assert admission.depth == 0
        fast = Admission(_Table({"s0": 1}), Policy.CONSOLIDATE, False, 8, 0.05, RouterMetrics())
        assert fast.place_now(Demand("a", 10)) is not None
        with pytest.raises(Exception, match="--queue-timeout-s"):
            await fast.place(Demand("a", 10))
        assert fast.depth == 0
        reservation.release()

    asyncio.run(scenario())
