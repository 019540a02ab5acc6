"""Where each adapter version lives, host memory or device memory, and which copies may leave.

What the shard wants kept, by adapter id: pinned adapters (LoadAdapter with pin; only their
newest version), the adapters waiting requests need (set once per step) and those being
preloaded. The device tier evicts idle copies nobody wants first; the host tier keeps a wanted
current version until it has reached the device.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from functools import partial

import structlog
import torch

from shard.adapters.device import DeviceTier
from shard.adapters.host import HostTier
from shard.adapters.loader import AdapterError, split_key
from shard.adapters.tiers import Resident
from shard.adapters.versions import Versions
from shard.metrics import ShardMetrics

log = structlog.get_logger(__name__)


class Residency:
    """The host and device tiers of the adapter cache and what it wants kept. Guarded by the
    cache's lock, which the host tier also takes on the loader thread."""

    def __init__(
        self,
        versions: Versions,
        lock: threading.RLock,
        device: torch.device,
        budget_bytes: int,
        host_budget_bytes: int,
        metrics: ShardMetrics | None,
    ) -> None:
        self.versions = versions
        self.metrics = metrics
        self.pinned: set[str] = set()
        self.wanted: frozenset[str] = frozenset()  # ids that waiting requests need
        self.preloading: Counter[str] = Counter()
        self.host_tier = HostTier(
            host_budget_bytes,
            device.type == "cuda",
            lock,
            self._host_protected,
            partial(self.evicted, "host"),
        )
        self.device_tier = DeviceTier(device, budget_bytes)

    def pinned_newest(self, key: str) -> bool:
        """Whether `key` is the newest version of a pinned adapter (older ones are not pinned)."""
        adapter_id = split_key(key)[0]
        return adapter_id in self.pinned and self.versions.is_current(key)

    def pin_share_error(self, adapter_id: str) -> AdapterError | None:
        """The error when pins, `adapter_id`'s included, would hold more than half of the device
        budget (see `DeviceTier.pin_share_error`); `adapter_id` is unpinned then."""
        err = self.device_tier.pin_share_error(adapter_id, self.pinned_newest)
        if err is not None:
            self.pinned.discard(adapter_id)
        return err

    def make_room(self, nbytes: int) -> bool:
        """Evicts idle, unpinned, not awaited device entries until `nbytes` fit."""
        for key in self.device_tier.make_room(
            nbytes, self._evictable, lambda k: split_key(k)[0] in self.wanted
        ):
            self.evicted("gpu", key)
        return self.device_tier.fits(nbytes)

    def copied(self, res: Resident) -> None:
        """`res`'s copy to the device has finished: its pinned source may go."""
        res.ready, res.source = None, None
        seconds = time.perf_counter() - res.started
        if self.metrics is not None:
            self.metrics.adapter_load_seconds.labels("host_to_gpu").observe(seconds)
            self.metrics.adapter_load_time.labels(split_key(res.key)[0]).observe(seconds)

    def drop(self, key: str) -> None:
        """Removes a version from both tiers, except from the device while requests use it."""
        self.host_tier.copies.pop(key, None)
        res = self.device_tier.resident.get(key)
        if res is not None and res.refs == 0:
            del self.device_tier.resident[key]
        self.gauges()

    def evicted(self, tier: str, key: str) -> None:
        log.info("adapter evicted", tier=tier, key=key)
        if self.metrics is not None:
            self.metrics.adapter_evictions.labels(tier).inc()

    def gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.adapter_bytes.labels("gpu").set(self.device_tier.used_bytes)
            self.metrics.adapter_bytes.labels("host").set(self.host_tier.used_bytes)

    def _needed(self, adapter_id: str) -> bool:
        return adapter_id in self.wanted or adapter_id in self.preloading

    def _host_protected(self, key: str) -> bool:
        res = self.device_tier.resident.get(key)
        if res is not None:
            return res.source is not None  # its copy to the device is still reading it
        return self._needed(split_key(key)[0]) and self.versions.is_current(key)

    def _evictable(self, key: str, res: Resident) -> bool:
        awaited = res.fresh and self._needed(split_key(key)[0])
        return res.refs == 0 and not self.pinned_newest(key) and not awaited
