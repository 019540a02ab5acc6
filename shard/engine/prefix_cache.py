"""The prefix cache: keys and values of full prompt blocks, shared by the requests of one adapter
version that start with the same tokens.

A block is the `page_size` tokens one KV page holds. Its key is a hash chain: the hash of the
previous block's key and this block's tokens, rooted in the adapter version (`id@version`, where
the version is a digest of the adapter's config and weights) or in the base model's own root. A
block matches only when every token before it matches too, on exactly the same weights: keys and
values are never shared across adapters, nor across versions of one adapter (LoRA changes the
hidden states of every layer).

The cached pages stay in the KV pool (`PagePool.keep`): held by the requests that read them, and
idle, reclaimable, least recently used first, once no request holds them. A reloaded adapter's
old version is retired: its blocks leave the index and its idle pages are freed. The index
(`shard.engine.prefix_index`) is made first and given to the pool and the adapter cache, which
tell it of reclaimed pages and retired versions.

Engine thread only.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable
from collections.abc import Sequence as Tokens
from dataclasses import dataclass

from shard.engine.kv_cache import PagePool
from shard.engine.prefix_index import BlockIndex
from shard.engine.prefix_keys import PrefixKeys
from shard.metrics import ShardMetrics

BASE_ROOT = b"lorafleet-prefix/base-model"


def chain_root(adapter_key: str) -> bytes:
    """The hash every chain of `adapter_key` starts from ("" is the base model)."""
    if not adapter_key:
        return hashlib.sha256(BASE_ROOT).digest()
    return hashlib.sha256(b"lorafleet-prefix/adapter/" + adapter_key.encode()).digest()


def extend_chain(
    adapter_key: str, tokens: Tokens[int], hashes: list[bytes], page_size: int
) -> None:
    """Appends to `hashes` the keys of the full blocks of `tokens` it does not cover yet (tokens
    only grow, so the keys already there stay valid)."""
    parent = hashes[-1] if hashes else chain_root(adapter_key)
    for block in range(len(hashes), len(tokens) // page_size):
        ids = array("I", tokens[block * page_size : (block + 1) * page_size])
        parent = hashlib.sha256(parent + ids.tobytes()).digest()
        hashes.append(parent)


@dataclass(frozen=True, slots=True)
class Admission:
    """The pages of a request being admitted: its cached prefix, then fresh ones."""

    pages: list[int]
    cached_tokens: int  # tokens whose keys and values the cached pages already hold


class PrefixCache:
    """Block key -> KV page, over the pages a `PagePool` keeps."""

    def __init__(
        self,
        pool: PagePool,
        index: BlockIndex,
        page_size: int,
        is_current: Callable[[str], bool] = lambda key: True,
        metrics: ShardMetrics | None = None,
    ) -> None:
        """`pool`: made to tell `index` of the pages it reclaims. `is_current(key)`: whether
        adapter version `key` is still the one new requests get; blocks of an older version are
        not added (a request that outlives a reload finishes on its version, but no later
        request can use that version's keys and values)."""
        if pool.on_reclaim != index.reclaimed:
            raise ValueError("the prefix cache's pool must be made with on_reclaim=index.reclaimed")
        self.pool = pool
        self.index = index
        self.page_size = page_size
        self.is_current = is_current
        self.metrics = metrics
        if metrics is not None:
            metrics.prefix_cached_pages.set_function(lambda: self.pool.kept)
            metrics.prefix_idle_pages.set_function(lambda: self.pool.idle)

    @property
    def blocks(self) -> int:
        """Blocks in the index."""
        return len(self.index)

    @property
    def keys(self) -> PrefixKeys:
        """The requests' prefix keys whose first block is cached, for load snapshots."""
        return self.index.keys

    def sync(self) -> None:
        """Applies the retirements the adapter cache reported (once per step)."""
        for page in self.index.drop_retired():
            self.pool.unkeep(page)

    def admit(
        self, adapter_key: str, tokens: Tokens[int], hashes: list[bytes], need: int
    ) -> Admission | None:
        """`need` pages for a request of `tokens` being admitted: the pages of its longest cached
        prefix of full blocks (held once more), then fresh ones; None, holding nothing, when they
        do not fit. At least the last token is left to compute, so the request gets its logits.
        `hashes` (the request's block keys, kept across admissions) is extended to cover
        `tokens`."""
        extend_chain(adapter_key, tokens, hashes, self.page_size)
        cached: list[int] = []
        for block in hashes[: min((len(tokens) - 1) // self.page_size, need)]:
            page = self.index.page_of.get(block)
            if page is None:
                break
            cached.append(page)
        self.pool.hold(cached)
        fresh = self.pool.alloc(need - len(cached))
        if fresh is None:
            self.pool.release(cached)
            return None
        hit = len(cached) * self.page_size
        if self.metrics is not None:
            self.metrics.prefix_lookup(adapter_key, hit, len(tokens))
        return Admission(cached + fresh, hit)

    def insert(
        self, adapter_key: str, hashes: list[bytes], pages: list[int], first: int, end: int
    ) -> int:
        """Adds blocks [first, end) of a request (their keys and values are computed) and
        returns `end`, the request's next first block. A block whose key another page holds
        already stays the request's own (it is freed with the request)."""
        if end <= first or not self.is_current(adapter_key):
            return max(first, end)
        for block in range(first, end):
            if self.index.add(adapter_key, hashes[block], pages[block]):
                self.pool.keep(pages[block])
        return end

    def note_key(self, prefix_key: int, hashes: list[bytes]) -> None:
        """A request with `prefix_key` (see `protos.prefix_key`) and block keys `hashes` was
        admitted or had blocks added: the key is reported while its first block is cached."""
        if hashes and hashes[0] in self.index.page_of:
            self.keys.note(prefix_key, hashes[0])
