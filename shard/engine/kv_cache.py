"""The separable KV cache: one preallocated pool of fixed-size pages per layer.

Each request has a page table (a list of page ids), so requests join and leave the batch
independently, without copies. Pages are reference-counted: requests of the same adapter version
that share a prompt prefix share its full pages (see `shard.engine.prefix_cache`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from shard.model.config import ModelConfig
from shard.model.sharding import local_kv_heads
from shard.parallel.group import TPGroup


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` tokens."""
    return -(-tokens // page_size)


class PagePool:
    """Reference-counted page ids; allocation is all-or-nothing.

    A page is free, held (by one or more requests: refs > 0), or kept by the prefix cache. A
    kept page that no request holds is idle: its keys and values wait for a request with the
    same prefix, but it is reclaimable capacity. When the free list runs dry, `alloc` takes idle
    kept pages, least recently released first, and tells the prefix cache's index through
    `on_reclaim`.
    """

    def __init__(self, num_pages: int, on_reclaim: Callable[[int], None] | None = None) -> None:
        self.total = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        self._kept: set[int] = set()
        self._idle: OrderedDict[int, None] = OrderedDict()  # kept, unheld; LRU first
        # The prefix cache's index drops its entry of a kept page that `alloc` reclaims.
        self.on_reclaim = on_reclaim

    @property
    def free(self) -> int:
        """Pages `alloc` can hand out: free ones and idle kept ones (the pool's true room)."""
        return len(self._free) + len(self._idle)

    @property
    def kept(self) -> int:
        """Pages the prefix cache keeps, held or idle."""
        return len(self._kept)

    @property
    def idle(self) -> int:
        """Kept pages that no request holds."""
        return len(self._idle)

    def refs(self, page: int) -> int:
        return self._refs[page]

    def alloc(self, n: int) -> list[int] | None:
        """n page ids, each held once, or None when fewer than n can be had (nothing is taken
        then). Idle kept pages are reclaimed, least recently released first, once no page is
        free."""
        if n > self.free:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._idle.popitem(last=False)
                self._kept.discard(page)
                if self.on_reclaim is not None:
                    self.on_reclaim(page)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def hold(self, pages: list[int]) -> None:
        """One more holder of each page; a page must be held already or kept."""
        for page in pages:
            if self._refs[page] == 0:
                if page not in self._idle:
                    raise ValueError(f"page {page} is free: it can only be allocated")
                del self._idle[page]
            self._refs[page] += 1

    def release(self, pages: list[int]) -> None:
        """One holder fewer of each page. A page no one holds any more goes back to the free
        list, or, kept, becomes idle. Released in reverse, so that a request's first pages (the
        prefix others are most likely to share) are reclaimed last."""
        for page in reversed(pages):
            refs = self._refs[page] - 1
            if refs < 0:
                raise ValueError(f"page {page} released more often than it was held")
            self._refs[page] = refs
            if refs == 0:
                if page in self._kept:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    def keep(self, page: int) -> None:
        """The prefix cache keeps a held page: when its last holder releases it, it stays."""
        if self._refs[page] == 0:
            raise ValueError(f"page {page} is not held: only computed pages can be kept")
        self._kept.add(page)

    def unkeep(self, page: int) -> None:
        """The prefix cache lets a kept page go: free at once when no one holds it."""
        if page not in self._kept:
            return
        self._kept.discard(page)
        if page in self._idle:
            del self._idle[page]
            self._free.append(page)


class KvCache:
    """Keys and values of every layer: [layers, pages + 1, page_size, kv_heads_local, head_dim].

    The extra last page is scratch: padded rows of a CUDA-graph step write and read there, so it
    is never handed out by the pool.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        group: TPGroup,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        on_reclaim: Callable[[int], None] | None = None,
    ) -> None:
        """`on_reclaim`: told of each idle cached page the pool reclaims (the prefix cache's
        index)."""
        if num_pages < 1:
            raise ValueError(f"the KV cache needs at least one page, got {num_pages}")
        shape = (cfg.num_layers, num_pages + 1, page_size, local_kv_heads(cfg, group), cfg.head_dim)
        # Zeroed so that unwritten slots never hold NaN that a masked read could pick up.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self.pool = PagePool(num_pages, on_reclaim)
        self.scratch_page = num_pages

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, group: TPGroup, page_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        per_token = 2 * cfg.num_layers * local_kv_heads(cfg, group) * cfg.head_dim * elem
        return per_token * page_size
