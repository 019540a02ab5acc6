"""The device tier's eviction order and the ordering of a claimed copy that is in flight."""

from __future__ import annotations

import torch

from shard.adapters.device import DeviceTier, copy_done, order_after_copy
from shard.adapters.tiers import Resident


def entry(key: str, nbytes: int, refs: int = 0) -> Resident:
    return Resident(key, None, torch.empty(nbytes, dtype=torch.uint8), None, None, 0.0, refs)  # type: ignore[arg-type]


def tier(*entries: Resident, budget: int = 400) -> DeviceTier:
    t = DeviceTier(torch.device("cpu"), budget)
    for e in entries:
        t.resident[e.key] = e
    return t


def test_idle_adapters_no_waiting_request_wants_leave_first_in_lru_order() -> None:
    t = tier(entry("a@1", 100), entry("b@1", 100), entry("c@1", 100), entry("d@1", 100))
    evicted = t.make_room(200, lambda k, r: True, lambda k: k in ("a@1", "c@1"))
    assert evicted == ["b@1", "d@1"]
    assert list(t.resident) == ["a@1", "c@1"] and t.fits(200)


def test_wanted_adapters_leave_when_nothing_else_makes_room_and_busy_ones_never() -> None:
    t = tier(entry("a@1", 100), entry("b@1", 100, refs=1), entry("c@1", 100), entry("d@1", 100))
    evicted = t.make_room(300, lambda k, r: r.refs == 0, lambda k: k in ("a@1", "c@1"))
    assert evicted == ["d@1", "a@1", "c@1"]
    assert list(t.resident) == ["b@1"] and t.fits(300)
    assert t.make_room(400, lambda k, r: r.refs == 0, lambda k: False) == []
    assert not t.fits(400)


class Copy:
    def __init__(self) -> None:
        self.done = False
        self.waited_on: list[object] = []

    def query(self) -> bool:
        return self.done

    def wait(self, stream: object = None) -> None:
        self.waited_on.append(stream)


def test_a_claimed_copy_in_flight_orders_the_compute_after_it() -> None:
    res = entry("a@1", 8)
    assert copy_done(res)
    order_after_copy(res)  # nothing in flight: nothing to wait for
    res.ready = Copy()  # type: ignore[assignment]
    assert not copy_done(res)
    order_after_copy(res)
    assert res.ready.waited_on == [None]  # type: ignore[union-attr]
    res.ready.done = True  # type: ignore[union-attr]
    assert copy_done(res)
