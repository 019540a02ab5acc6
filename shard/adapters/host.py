"""The host tier of the adapter cache: adapter versions read from disk, each packed into one
host buffer (pinned on CUDA shards, so that its trip to the device is one asynchronous copy),
under a byte budget, evicted least recently used among those the cache does not protect. The
loader thread reserves a version's bytes before packing it, so reads never overshoot the budget.
Guarded by the cache's lock; the cache decides what may be evicted."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from shard.adapters.loader import AdapterError, AdapterErrorKind, pack, packed_size
from shard.adapters.tiers import HostCopy, evict_until_fits
from shard.model.lora_weights import AdapterWeights


class HostTier:
    """Host copies (LRU first) and the bytes reserved for the reads being packed."""

    def __init__(
        self,
        budget_bytes: int,
        pin: bool,
        lock: threading.RLock,
        protected: Callable[[str], bool],
        evicted: Callable[[str], None],
    ) -> None:
        self.budget_bytes = budget_bytes
        self.pin = pin
        self.copies: OrderedDict[str, HostCopy] = OrderedDict()  # LRU first
        self.reserved = 0  # bytes set aside for reads being packed
        self._lock = lock
        self._protected = protected  # called under the lock: a copy that may not be evicted
        self._evicted = evicted  # hears of each evicted copy, under the lock

    @property
    def used_bytes(self) -> int:
        return sum(h.flat.numel() for h in self.copies.values())

    def admit(
        self, weights: AdapterWeights, device_budget_bytes: int, closed: Callable[[], bool]
    ) -> HostCopy | None:
        """Loader thread, for a version just read: the copy of it that the tier holds already,
        else None once its bytes are reserved (`pack` fills them). Refuses a version larger than
        either budget (it could never be served); waits while the tier is full of protected
        copies (those that waiting requests need reach the device, then room frees)."""
        nbytes = packed_size(weights)
        for budget, flag in (
            (self.budget_bytes, "--adapter-host-memory-mb"),
            (device_budget_bytes, "--adapter-memory-mb"),
        ):
            if nbytes > budget:
                raise AdapterError(
                    AdapterErrorKind.UNSUPPORTED,
                    f"adapter {weights.adapter_id!r} needs {nbytes / 2**20:.1f} MiB but {flag} "
                    f"allows {budget / 2**20:.1f} MiB",
                )
        while True:
            with self._lock:
                host = self.copies.get(weights.key)
                if host is not None or self._reserve(nbytes):
                    return host
            if closed():
                raise AdapterError(AdapterErrorKind.UNSUPPORTED, "the shard is shutting down")
            time.sleep(0.002)

    def pack(self, weights: AdapterWeights) -> HostCopy:
        """Loader thread, outside the lock, once `admit` reserved room: `weights` in one buffer.
        The reservation ends either way; the caller adds the copy to `copies`."""
        try:
            flat, packed = pack(weights, pin=self.pin)
            return HostCopy(packed, flat, time.time())
        finally:
            with self._lock:
                self.reserved -= packed_size(weights)

    def _reserve(self, nbytes: int) -> bool:
        """Evicts unprotected copies, least recently used first, until `nbytes` fit, and
        reserves them; False when they do not fit yet (a partial eviction is harmless: those
        copies were not protected)."""
        idle = [key for key in self.copies if not self._protected(key)]
        used = self.used_bytes + self.reserved
        evicted, used = evict_until_fits(self.copies, idle, used, nbytes, self.budget_bytes)
        for key in evicted:
            self._evicted(key)
        if used + nbytes > self.budget_bytes:
            return False
        self.reserved += nbytes
        return True
