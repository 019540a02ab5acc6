"""Which version of each adapter new requests get.

A version is named `id@version`, the version a digest of the bytes read. Reading an adapter's
files again after they changed makes a new version current; the one it replaces is retired,
and whoever listens (the prefix cache) drops what it keyed on it. Requests already running keep
their version until they end.
"""

from __future__ import annotations

from collections.abc import Callable

from shard.adapters.loader import FileSig, split_key


class Versions:
    """The current version of each adapter id, the files it was read from, and the exact
    versions asked for by name. Not thread-safe: guarded by the adapter cache's lock."""

    def __init__(self, on_retired: Callable[[str], None] | None = None) -> None:
        self.current: dict[str, str] = {}  # id -> key of its newest version
        self._sigs: dict[str, FileSig] = {}  # id -> the files its newest version was read from
        self._asked: dict[str, str] = {}  # id -> exact version a read was started for
        # Told the key of every version that stops being current; called from whichever thread
        # replaced or evicted it, with the cache's lock held: it must be quick.
        self._on_retired = on_retired

    def get(self, adapter_id: str) -> str | None:
        return self.current.get(adapter_id)

    def is_current(self, key: str) -> bool:
        return self.current.get(split_key(key)[0]) == key

    def stale(self, adapter_id: str, sig: FileSig) -> bool:
        """Whether the adapter has a current version and its files are no longer those."""
        return adapter_id in self.current and self._sigs.get(adapter_id) != sig

    def adopt(self, adapter_id: str, key: str, sig: FileSig) -> str | None:
        """`key`, just read from files `sig`, becomes current; the version it replaces, if any
        other (the caller drops it, then `retire`s it)."""
        old = self.current.get(adapter_id)
        self.current[adapter_id] = key
        self._sigs[adapter_id] = sig
        if self._asked.get(adapter_id) == key:
            del self._asked[adapter_id]  # the version asked for was read: no change to report
        return old if old != key else None

    def forget(self, adapter_id: str) -> str | None:
        """The adapter has no current version any more (the next request reads its files);
        the one it had, for the caller to drop and retire."""
        self._sigs.pop(adapter_id, None)
        return self.current.pop(adapter_id, None)

    def gone(self, adapter_id: str, key: str) -> bool:
        """Exact version `key` is asked for and is in no tier: True when a read started for it
        already brought another version (the files changed: `key` is gone for good); otherwise
        notes that a read is started for it and answers False."""
        if self._asked.get(adapter_id) == key:
            del self._asked[adapter_id]
            return True
        self._asked[adapter_id] = key
        return False

    def retire(self, key: str) -> None:
        if self._on_retired is not None:
            self._on_retired(key)
