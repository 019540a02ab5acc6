"""The host tier's admission: refusing what never fits, reserving room (evicting unprotected
copies in LRU order) before packing, and waiting while the tier is full of protected copies."""

from __future__ import annotations

import threading

import pytest
import torch

from shard.adapters.host import HostTier
from shard.adapters.loader import AdapterError, AdapterErrorKind, packed_size
from shard.model.lora_weights import AdapterWeights


def weights(adapter_id: str, rank: int = 4) -> AdapterWeights:
    a = {"q_proj": torch.randn(2, rank, 16)}  # [L, r, in]
    b = {"q_proj": torch.randn(2, rank, 16)}  # [L, r, out]
    return AdapterWeights(adapter_id, "digest", "v1", rank, 1.0, a, b)


def tier(budget: int, protected: set[str]) -> tuple[HostTier, list[str]]:
    evicted: list[str] = []
    t = HostTier(budget, False, threading.RLock(), protected.__contains__, evicted.append)
    return t, evicted


def admit_and_pack(t: HostTier, w: AdapterWeights) -> None:
    assert t.admit(w, 2**30, lambda: False) is None
    assert t.reserved == packed_size(w)
    t.copies[w.key] = t.pack(w)
    assert t.reserved == 0
    assert torch.equal(t.copies[w.key].weights.b["q_proj"], w.b["q_proj"])


def test_room_is_made_least_recently_used_first_sparing_protected_copies() -> None:
    size = packed_size(weights("a"))
    t, evicted = tier(3 * size, {"a@v1"})
    for adapter_id in "abc":
        admit_and_pack(t, weights(adapter_id))
    assert t.used_bytes == 3 * size and evicted == []
    admit_and_pack(t, weights("d"))
    assert evicted == ["b@v1"] and list(t.copies) == ["a@v1", "c@v1", "d@v1"]
    held = t.copies["c@v1"]
    assert t.admit(weights("c"), 2**30, lambda: False) is held  # already held: no reservation
    assert t.reserved == 0


def test_a_version_larger_than_either_budget_is_refused() -> None:
    w = weights("big")
    t, _ = tier(packed_size(w) - 1, set())
    with pytest.raises(AdapterError, match="--adapter-host-memory-mb") as err:
        t.admit(w, 2**30, lambda: False)
    assert err.value.kind is AdapterErrorKind.UNSUPPORTED
    t.budget_bytes = 2**30
    with pytest.raises(AdapterError, match="--adapter-memory-mb"):
        t.admit(w, packed_size(w) - 1, lambda: False)


def test_a_tier_full_of_protected_copies_waits_until_the_shard_closes() -> None:
    size = packed_size(weights("a"))
    t, evicted = tier(size, {"a@v1"})
    admit_and_pack(t, weights("a"))
    polls: list[int] = []

    def closed() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(AdapterError, match="shutting down"):
        t.admit(weights("b"), 2**30, closed)
    assert len(polls) == 4 and evicted == [] and t.reserved == 0
