"""The prefix cache's index: which KV page holds each cached block, and which pages each adapter
version has.

Two parts made before the prefix cache take entries away from it, and each is given the index
when it is made: the page pool tells it of an idle cached page it reclaims for an allocation
(`reclaimed`, on the engine thread), the adapter cache of a version that stops being current
(`retire`, from any thread; applied by the prefix cache's next `sync`).
"""

from __future__ import annotations

from collections import deque

from shard.engine.prefix_keys import PrefixKeys
from shard.metrics import ShardMetrics


class BlockIndex:
    """Block key <-> page, per adapter version. Engine thread only, except `retire`."""

    def __init__(self, metrics: ShardMetrics | None = None) -> None:
        self.metrics = metrics
        self.page_of: dict[bytes, int] = {}  # block key -> page
        self.block_of: dict[int, tuple[str, bytes]] = {}  # page -> (adapter key, block key)
        self._pages_of: dict[str, set[int]] = {}  # adapter key -> its cached pages
        self._retired: deque[str] = deque()  # appended by other threads, drained by `drop_retired`
        # The requests' prefix keys whose first block is cached, for load snapshots.
        self.keys = PrefixKeys()

    def __len__(self) -> int:
        """Blocks in the index."""
        return len(self.page_of)

    def add(self, adapter_key: str, block: bytes, page: int) -> bool:
        """Indexes `page` as block `block` of `adapter_key`; False, changing nothing, when the
        block or the page is indexed already."""
        if block in self.page_of or page in self.block_of:
            return False
        self.page_of[block] = page
        self.block_of[page] = (adapter_key, block)
        self._pages_of.setdefault(adapter_key, set()).add(page)
        return True

    def retire(self, adapter_key: str) -> None:
        """Adapter version `adapter_key` was replaced or evicted: its blocks go at the next
        `drop_retired`. Thread-safe (the adapter cache calls it from its threads, under its
        lock: it must be quick)."""
        self._retired.append(adapter_key)

    def drop_retired(self) -> list[int]:
        """Drops the blocks of the versions retired since the last call; returns their pages."""
        dropped: list[int] = []
        while self._retired:
            pages = self._pages_of.pop(self._retired.popleft(), set())
            for page in pages:
                self._forget(page)
            dropped.extend(pages)
            if pages and self.metrics is not None:
                self.metrics.prefix_retired_pages.inc(len(pages))
        return dropped

    def reclaimed(self, page: int) -> None:
        """The pool took idle cached page `page` back for an allocation."""
        adapter_key = self._forget(page)
        pages = self._pages_of[adapter_key]
        pages.discard(page)
        if not pages:
            del self._pages_of[adapter_key]
        if self.metrics is not None:
            self.metrics.prefix_evicted_pages.inc()

    def _forget(self, page: int) -> str:
        """Drops `page`'s block from the block maps and the reported keys; its adapter key."""
        adapter_key, block = self.block_of.pop(page)
        del self.page_of[block]
        self.keys.dropped(block)
        return adapter_key
