"""The separable KV cache: one preallocated pool of fixed-size pages per layer.

Each request owns a page table (a list of page ids), so requests join and leave the batch
independently, without copies.
"""

from __future__ import annotations

import torch

from shard.llama import local_kv_heads
from shard.model_config import ModelConfig
from shard.parallel import TPGroup


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` tokens."""
    return -(-tokens // page_size)


class PagePool:
    """Free list of page ids; allocation is all-or-nothing."""

    def __init__(self, num_pages: int) -> None:
        self.total = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n page ids, or None when fewer than n are free (nothing is taken then)."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


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
    ) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV cache needs at least one page, got {num_pages}")
        shape = (cfg.num_layers, num_pages + 1, page_size, local_kv_heads(cfg, group), cfg.head_dim)
        # Zeroed so that unwritten slots never hold NaN that a masked read could pick up.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self.pool = PagePool(num_pages)
        self.scratch_page = num_pages

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, group: TPGroup, page_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        per_token = 2 * cfg.num_layers * local_kv_heads(cfg, group) * cfg.head_dim * elem
        return per_token * page_size
