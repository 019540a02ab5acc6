"""The prefix keys a shard reports: which requests' prefixes (`protos.prefix_key`) its prefix
cache holds, for the router's prefix affinity.

A key stands for the first block of the chain its requests start with (the block every request
with that key shares, and the last one of an idle chain to be reclaimed: pages are released in
reverse). It is reported while that block is in the cache, and dropped with it (reclaimed,
retired by a hot reload). At most `max_keys` are kept, least recently used dropped first, so a
snapshot's key list stays bounded whatever the traffic.

Engine thread only; `current` is a frozenset rebuilt only after a change, so the engine's load
snapshot costs nothing while the keys stay the same.
"""

from __future__ import annotations

from collections import OrderedDict

# Keys a shard reports at most (8 bytes each in a full snapshot; deltas carry only changes).
MAX_KEYS = 256


class PrefixKeys:
    """Prefix key -> the block key of its chain's first block, bounded, LRU."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._block_of: OrderedDict[int, bytes] = OrderedDict()  # LRU first
        self._keys_of: dict[bytes, set[int]] = {}  # block key -> prefix keys on it
        self._frozen: frozenset[int] = frozenset()
        self._stale = False

    @property
    def current(self) -> frozenset[int]:
        """The keys to report now."""
        if self._stale:
            self._frozen = frozenset(self._block_of)
            self._stale = False
        return self._frozen

    def note(self, key: int, block: bytes) -> None:
        """A request with prefix key `key` starts with cached block `block` (used now)."""
        old = self._block_of.get(key)
        if old == block:
            self._block_of.move_to_end(key)
            return
        if old is not None:
            self._unlink(key, old)
        self._block_of[key] = block
        self._keys_of.setdefault(block, set()).add(key)
        self._stale = True
        while len(self._block_of) > self.max_keys:
            oldest, its_block = self._block_of.popitem(last=False)
            self._unlink(oldest, its_block)

    def dropped(self, block: bytes) -> None:
        """Block `block` left the cache: the keys that stood for it go."""
        keys = self._keys_of.pop(block, None)
        if keys:
            for key in keys:
                del self._block_of[key]
            self._stale = True

    def _unlink(self, key: int, block: bytes) -> None:
        keys = self._keys_of[block]
        keys.discard(key)
        if not keys:
            del self._keys_of[block]
        self._stale = True
