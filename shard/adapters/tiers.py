"""What one adapter version is in each tier of the cache, and the device budget rule."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch

from shard.model.lora_weights import AdapterWeights


@dataclass(slots=True)
class HostCopy:
    """One adapter version in host memory (pinned on CUDA shards), packed in one buffer so that
    its trip to the device is a single copy."""

    weights: AdapterWeights  # views into `flat`
    flat: torch.Tensor  # [nbytes] uint8
    last_used: float = 0.0


@dataclass(slots=True)
class Resident:
    """An adapter version in device memory (hot, mutable state)."""

    key: str  # id@version
    weights: AdapterWeights  # views into `flat`
    flat: torch.Tensor  # [nbytes] uint8 on the device
    ready: torch.cuda.Event | None  # set when its host-to-device copy has finished
    source: HostCopy | None  # keeps the pinned source alive until the copy has finished
    started: float  # perf_counter() when the copy was queued
    refs: int = 0  # running requests that use it
    last_used: float = 0.0
    # Copied for a waiting request that has not claimed it yet: spared by eviction while that
    # request still waits, or copies for different waiting requests would evict each other.
    fresh: bool = True


Tiered = TypeVar("Tiered", HostCopy, Resident)


def evict_until_fits(
    entries: OrderedDict[str, Tiered], victims: Iterable[str], used: int, nbytes: int, budget: int
) -> tuple[list[str], int]:
    """Pops `victims` (keys of `entries`, in eviction order) until `nbytes` more fit beside
    `used` bytes under `budget`. Returns the evicted keys and the bytes then used; `nbytes` fit
    iff used + nbytes <= budget (a partial eviction is harmless: victims were idle)."""
    evicted = []
    for key in victims:
        if used + nbytes <= budget:
            break
        used -= entries.pop(key).flat.numel()
        evicted.append(key)
    return evicted, used


@dataclass(frozen=True, slots=True)
class AdapterEntry:
    """What ListAdapters reports for one adapter."""

    adapter_id: str
    residency: str  # "gpu" or "cpu" (on the compute device), "host" or "disk"
    rank: int  # of the loaded weights; on disk, the declared r (0: unreadable config)
    size_bytes: int
    digest: str
    last_used: float
    targets: tuple[str, ...]


def device_budget_bytes(adapter_memory_mb: int) -> int:
    """Device bytes the adapter cache may hold (what the KV planner sets aside): resident
    adapters of every version never exceed it, copies in flight included."""
    return adapter_memory_mb * 2**20


def entry_of(adapter_id: str, res: Resident | None, host: HostCopy | None) -> AdapterEntry:
    """What ListAdapters reports for a version found in these tiers (neither: on disk only)."""
    w = res.weights if res else (host.weights if host else None)
    if w is None:
        return AdapterEntry(adapter_id, "disk", 0, 0, "", 0.0, ())
    return AdapterEntry(
        adapter_id,
        ("gpu" if res.flat.is_cuda else "cpu") if res else "host",
        w.rank,
        w.nbytes,
        w.digest,
        max(res.last_used if res else 0.0, host.last_used if host else 0.0),
        w.targets,
    )
