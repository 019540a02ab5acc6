"""The device tier of the adapter cache: adapter versions in device memory under a byte budget,
copied in from the host tier on a side stream, evicted least recently used among those that no
running request uses. Guarded by the cache's lock; the cache decides what may be evicted."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from shard.adapters.loader import AdapterError, AdapterErrorKind, carve
from shard.adapters.tiers import HostCopy, Resident, evict_until_fits


class DeviceTier:
    """Resident versions (LRU first) and the copies that bring them in."""

    def __init__(self, device: torch.device, budget_bytes: int) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self.resident: OrderedDict[str, Resident] = OrderedDict()  # LRU first
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def used_bytes(self) -> int:
        return sum(r.flat.numel() for r in self.resident.values())

    def make_room(
        self, nbytes: int, evictable: Callable[[str, Resident], bool], wanted: Callable[[str], bool]
    ) -> list[str]:
        """Evicts `evictable` entries until `nbytes` fit: least recently used first, but those
        that no waiting request `wanted` before those that one does (a waiting request whose
        adapter is resident costs no copy). Returns the evicted keys; `nbytes` fit iff
        `fits(nbytes)` afterwards (a partial eviction is harmless: those entries were idle)."""
        idle = [k for k, r in self.resident.items() if evictable(k, r)]
        idle.sort(key=wanted)  # stable: LRU order within each group
        evicted, _ = evict_until_fits(
            self.resident, idle, self.used_bytes, nbytes, self.budget_bytes
        )
        return evicted

    def fits(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.budget_bytes

    def pin_share_error(
        self, adapter_id: str, pinned: Callable[[str], bool]
    ) -> AdapterError | None:
        """Pins may hold at most half of the budget, so that requests for unpinned adapters
        always find room (they would wait forever behind a budget full of pins): the error
        when the `pinned` entries, `adapter_id`'s included, hold more."""
        held = sum(res.flat.numel() for key, res in self.resident.items() if pinned(key))
        if held <= self.budget_bytes // 2:
            return None
        return AdapterError(
            AdapterErrorKind.EXHAUSTED,
            f"pinning {adapter_id!r} would hold {held / 2**20:.1f} MiB of pinned adapters, more "
            f"than half of the device adapter budget ({self.budget_bytes / 2**20:.1f} MiB, "
            "--adapter-memory-mb); it stays loaded unpinned. Unpin others (EvictAdapter) or "
            "raise the budget",
        )

    def copy_in(self, key: str, host: HostCopy) -> Resident:
        """Starts the host -> device copy of `key`; the caller adds the entry to `resident`."""
        if self._stream is None:
            return Resident(key, host.weights, host.flat, None, None, time.perf_counter())
        # Freed device entries are never in use by a queued forward: the engine syncs every step
        # (sampling) and evicts only adapters no running request holds.
        with torch.cuda.stream(self._stream):
            flat = host.flat.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return Resident(key, carve(flat, host.weights), flat, event, host, time.perf_counter())


def copy_done(res: Resident) -> bool:
    """Whether the copy of `res` has finished (without waiting)."""
    return res.ready is None or res.ready.query()


def order_after_copy(res: Resident) -> None:
    """Makes work issued next on this thread's current (compute) stream wait for the copy of
    `res` on the device, not on the host: a request admitted while its adapter is still in
    flight runs in this very step, and the step waits only for the rest of the copy."""
    if res.ready is not None:
        dev = res.flat.device
        res.ready.wait(torch.cuda.current_stream(dev) if dev.type == "cuda" else None)
