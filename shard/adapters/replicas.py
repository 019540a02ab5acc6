"""Adapter residency across tensor-parallel ranks, rank 0's side: every rank reads an adapter's
files itself, so a version enters step plans only once every follower has read exactly that
version (same `id@version`, a hash of the bytes read) and holds it. Files replaced between
rank 0's read and a follower's make rank 0 read them again, so one request never mixes two
versions across ranks and no rank fails on a version it cannot find.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager

from shard.adapters.loader import AdapterError

# (version, the versions rank 0 still has on the device) -> None once every follower holds the
# version (and still holds those it keeps), or the error one of them met.
Replicate = Callable[[str, tuple[str, ...]], AdapterError | None]
MAX_CHANGED_RETRIES = 3  # re-reads in a row after followers found other files than rank 0


class Replicas:
    """Rank 0's record of the versions every follower holds (guarded by the cache's lock)."""

    def __init__(self, replicate: Replicate) -> None:
        self.replicate = replicate
        self.held: set[str] = set()
        self.round = threading.Lock()  # one round with the followers at a time
        self._changed: Counter[str] = Counter()  # id -> rounds in a row that met new files

    def confirm(
        self, key: str, lock: AbstractContextManager, resident: Collection[str]
    ) -> AdapterError | None:
        """One round for `key`, resident on rank 0; `resident` is rank 0's live device tier,
        read under `lock` (the cache's). Followers release what rank 0 no longer has on the
        device, so what they hold fits the same budget; those versions leave `held` under the
        same lock, before the round, so a claim never trusts a version a follower let go."""
        with self.round:
            with lock:
                keep = tuple(k for k in resident if k != key)
                self.held.intersection_update(keep)
            err = self.replicate(key, keep)
            if err is None:
                with lock:
                    if key in resident:
                        self.held.add(key)
                    self._changed.pop(key.partition("@")[0], None)
        return err

    def retry(self, adapter_id: str) -> bool:
        """After followers found other files than rank 0: True while the adapter may be read
        again (its request waits for that), False when it changed too often in a row."""
        self._changed[adapter_id] += 1
        if self._changed[adapter_id] <= MAX_CHANGED_RETRIES:
            return True
        del self._changed[adapter_id]
        return False
