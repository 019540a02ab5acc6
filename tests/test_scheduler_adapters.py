"""Admission around adapters that are not resident yet: later requests overtake a loading one,
but not forever (a starving adapter stops the overtaking until it gets room)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shard.engine.kv_cache import PagePool
from shard.engine.sampling import SamplingParams
from shard.engine.scheduler import ADAPTER_WAIT_BARRIER_S, Scheduler
from shard.engine.sequence import EngineRequest, Sequence, StopParams


@dataclass
class Claimed:
    key: str
    weights: None = None  # what a claim hands the scheduler besides the key (no tensors here)


class Adapters:
    """The scheduler's view of the adapter cache: `slow` never becomes resident here."""

    def __init__(self, slow: str) -> None:
        self.slow = slow

    def want(self, adapter_ids: set[str]) -> None:
        self.wanted = adapter_ids

    def claim(self, adapter_id: str) -> Claimed | None:
        return None if adapter_id == self.slow else Claimed(f"{adapter_id}@v1")

    def release(self, key: str) -> None:
        pass


def seq(rid: str, adapter: str, arrival: float) -> Sequence:
    req = EngineRequest(
        request_id=rid,
        adapter_id=adapter,
        prompt_ids=(1, 2, 3),
        sampling=SamplingParams(),
        stopping=StopParams(max_new_tokens=4),
        arrival=arrival,
    )
    return Sequence(req, sink=lambda _: None, text=None)  # type: ignore[arg-type]


def scheduler(slow: str, max_batch: int = 8, pages: int = 64) -> Scheduler:
    return Scheduler(PagePool(pages), 4, max_batch, 10**9, Adapters(slow))  # type: ignore[arg-type]


def test_requests_overtake_an_adapter_that_is_loading() -> None:
    s = scheduler(slow="cold")
    now = time.monotonic()
    s.add(seq("a", "cold", now))
    s.add(seq("b", "hot", now))
    s.add(seq("c", "warm", now))
    out = s.schedule()
    assert [c.seq.request_id for c in out.prefill] == ["b", "c"]
    assert [q.request_id for q in s.waiting] == ["a"]
    assert s.adapters.wanted == {"cold", "hot", "warm"}


def test_a_starving_adapter_stops_the_overtaking() -> None:
    s = scheduler(slow="cold")
    now = time.monotonic()
    s.add(seq("a", "cold", now - ADAPTER_WAIT_BARRIER_S - 0.1))
    s.add(seq("b", "hot", now))
    s.add(seq("c", "", now))
    out = s.schedule()
    assert out.prefill == []
    assert [q.request_id for q in s.waiting] == ["a", "b", "c"]
    # Copies made for the requests behind it may be evicted to make room for its adapter.
    assert s.adapters.wanted == {"cold"}


LONG_QUEUE = 5000


def test_a_long_queue_is_admitted_in_one_fcfs_pass() -> None:
    """5,000 waiting requests, every other one on an adapter that is loading: the others are
    admitted in arrival order up to the batch limit, and the overtaken keep their order."""
    s = scheduler("cold", LONG_QUEUE, 4 * LONG_QUEUE)
    now = time.monotonic()
    for i in range(LONG_QUEUE):
        s.add(seq(f"r{i}", "cold" if i % 2 else f"hot{i % 7}", now))
    out = s.schedule()
    assert [c.seq.request_id for c in out.prefill] == [f"r{i}" for i in range(0, LONG_QUEUE, 2)]
    assert [q.request_id for q in s.waiting] == [f"r{i}" for i in range(1, LONG_QUEUE, 2)]
    assert all(c.seq.adapter_key == f"hot{int(c.seq.request_id[1:]) % 7}@v1" for c in out.prefill)


def test_a_long_queue_stops_at_the_batch_limit_and_at_a_starving_adapter() -> None:
    now = time.monotonic()
    s = scheduler("cold", 100, 4 * LONG_QUEUE)
    for i in range(LONG_QUEUE):
        s.add(seq(f"r{i}", "cold" if i % 3 == 0 else "hot", now))
    out = s.schedule()
    # Batch full after 100 admissions: requests 1, 2, 4, 5, ... ; the cold ones before the
    # last admitted one were overtaken and stay in front of the untouched rest, in order.
    admitted = [f"r{i}" for i in range(LONG_QUEUE) if i % 3][:100]
    assert [c.seq.request_id for c in out.prefill] == admitted
    assert [q.request_id for q in s.waiting] == [
        f"r{i}" for i in range(LONG_QUEUE) if f"r{i}" not in set(admitted)
    ]

    s = scheduler("cold", LONG_QUEUE, 4 * LONG_QUEUE)
    starving = LONG_QUEUE // 2
    for i in range(LONG_QUEUE):
        old = i == starving
        arrival = now - ADAPTER_WAIT_BARRIER_S - 0.1 if old else now
        s.add(seq(f"r{i}", "cold" if old or i % 3 == 0 else "hot", arrival))
    out = s.schedule()
    # Everything before the starving request that could run did; no one behind it was admitted.
    assert [c.seq.request_id for c in out.prefill] == [f"r{i}" for i in range(starving) if i % 3]
    waiting = [q.request_id for q in s.waiting]
    assert waiting[: starving // 3 + 1] == [f"r{i}" for i in range(0, starving, 3)]
    assert waiting[starving // 3 + 1 :] == [f"r{i}" for i in range(starving, LONG_QUEUE)]
