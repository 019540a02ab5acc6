"""Admission around adapters that are not resident yet: later requests overtake a loading one,
but not forever (a starving adapter stops the overtaking until it gets room)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shard.kv_cache import PagePool
from shard.sampling import SamplingParams
from shard.scheduler import ADAPTER_WAIT_BARRIER_S, Scheduler
from shard.sequence import EngineRequest, Sequence, StopParams


@dataclass
class Claimed:
    key: str


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


def scheduler(slow: str) -> Scheduler:
    return Scheduler(PagePool(64), 4, 8, 4096, Adapters(slow))  # type: ignore[arg-type]


def test_requests_overtake_an_adapter_that_is_loading() -> None:
    s = scheduler(slow="cold")
    now = time.monotonic()
    s.add(seq("a", "cold", now))
    s.add(seq("b", "hot", now))
    s.add(seq("c", "warm", now))
    out = s.schedule()
    assert [q.request_id for q in out.prefill] == ["b", "c"]
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
