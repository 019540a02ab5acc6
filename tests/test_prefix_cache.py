"""The reference-counted page pool and the prefix cache's index, without a model: hash chains
keyed by adapter version, longest-prefix hits, LRU reclaim of idle cached pages, retirement of a
replaced version, and the invariants a storm of random admissions and releases must keep."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from shard.engine.kv_cache import PagePool, pages_for
from shard.engine.prefix_cache import PrefixCache, chain_root, extend_chain
from shard.engine.prefix_index import BlockIndex
from shard.metrics import ShardMetrics

PAGE = 4


def make_cache(
    pages: int,
    is_current: Callable[[str], bool] = lambda key: True,
    metrics: ShardMetrics | None = None,
) -> PrefixCache:
    """A prefix cache over a pool of `pages`, both made as the shard makes them: the index
    first, told by the pool of the pages it reclaims."""
    index = BlockIndex(metrics)
    return PrefixCache(PagePool(pages, index.reclaimed), index, PAGE, is_current, metrics)


def chain(key: str, tokens: list[int]) -> list[bytes]:
    hashes: list[bytes] = []
    extend_chain(key, tokens, hashes, PAGE)
    return hashes


def computed(cache: PrefixCache, key: str, tokens: list[int]) -> list[int]:
    """Admits a request of `tokens`, registers all its full blocks as computed, releases it;
    returns the pages it had."""
    hashes: list[bytes] = []
    got = cache.admit(key, tokens, hashes, pages_for(len(tokens) + 1, PAGE))
    assert got is not None
    cache.insert(key, hashes, got.pages, 0, len(tokens) // PAGE)
    cache.pool.release(got.pages)
    return got.pages


def check_pool(pool: PagePool) -> None:
    """Every page is in exactly one state: free, held, or kept and idle."""
    free = set(pool._free)
    idle = set(pool._idle)
    held = {p for p in range(pool.total) if pool.refs(p) > 0}
    assert len(free) == len(pool._free), "a page is twice on the free list"
    assert not free & idle and not free & held and not idle & held
    assert free | idle | held == set(range(pool.total))
    assert idle <= pool._kept
    assert all(pool.refs(p) >= 0 for p in range(pool.total))


def test_pool_counts_holders_and_frees_at_the_last_release() -> None:
    pool = PagePool(4)
    a = pool.alloc(2)
    assert a == [0, 1] and pool.free == 2
    pool.hold([a[0]])
    pool.release(a)
    assert pool.refs(a[0]) == 1 and pool.refs(a[1]) == 0 and pool.free == 3
    pool.release([a[0]])
    assert pool.free == 4
    with pytest.raises(ValueError, match="released more often"):
        pool.release([a[0]])
    with pytest.raises(ValueError, match="is free"):
        pool.hold([3])
    with pytest.raises(ValueError, match="not held"):
        pool.keep(3)
    assert pool.alloc(5) is None and pool.free == 4  # all or nothing
    check_pool(pool)


def test_kept_pages_stay_idle_count_as_free_and_are_reclaimed_lru() -> None:
    reclaimed: list[int] = []
    pool = PagePool(4, reclaimed.append)
    first, second = pool.alloc(2), pool.alloc(2)
    for page in first + second:
        pool.keep(page)
    pool.release(second)  # released in reverse: page 3, then 2 (2 is the most recent)
    pool.release(first)
    assert pool.free == 4 and pool.idle == 4 and pool.kept == 4
    assert pool.alloc(3) == [3, 2, 1]  # least recently released first; a request's first last
    assert reclaimed == [3, 2, 1] and pool.kept == 1
    pool.hold([0])  # an idle kept page taken by a hit is not reclaimable
    assert pool.alloc(1) is None
    pool.unkeep(0)  # no longer kept: free at its last release
    pool.release([0])
    assert pool.alloc(1) == [0] and reclaimed == [3, 2, 1]
    check_pool(pool)


def test_chains_depend_on_every_earlier_token_and_on_the_adapter_version() -> None:
    tokens = list(range(10, 22))
    base = chain("", tokens)
    assert len(base) == 3  # full blocks only
    assert chain("", [*tokens, 1, 2, 3])[:3] == base
    changed = chain("", [11, *tokens[1:]])
    assert all(a != b for a, b in zip(base, changed, strict=True))  # the first token changes all
    assert chain("", [*tokens[:4], 0, *tokens[5:]])[0] == base[0] != chain("", [0, *tokens[1:]])[0]
    roots = {chain_root(k) for k in ("", "a@1", "a@2", "b@1")}
    assert len(roots) == 4
    assert len({chain(k, tokens)[0] for k in ("", "a@1", "a@2", "b@1")}) == 4
    grown: list[bytes] = []
    extend_chain("a@1", tokens[:5], grown, PAGE)
    extend_chain("a@1", tokens, grown, PAGE)
    assert grown == chain("a@1", tokens)


def test_hits_are_the_longest_prefix_of_the_same_version_and_leave_a_token() -> None:
    metrics = ShardMetrics()
    cache = make_cache(32, metrics=metrics)
    pool = cache.pool
    prompt = list(range(100, 112))  # 3 full blocks
    pages = computed(cache, "a@1", prompt)
    assert cache.blocks == 3 and pool.kept == 3 and pool.idle == 3

    for key in ("a@2", "b@1", ""):  # other versions, adapters, the base model: no hit
        got = cache.admit(key, [*prompt, 5], [], 4)
        assert got is not None and got.cached_tokens == 0
        assert not set(got.pages) & set(pages[:3])
        pool.release(got.pages)

    got = cache.admit("a@1", [*prompt, 5, 6], [], 4)  # all three blocks
    assert got is not None and got.cached_tokens == 12 and got.pages[:3] == pages[:3]
    assert [pool.refs(p) for p in got.pages[:3]] == [1, 1, 1] and pool.idle == 0
    again = cache.admit("a@1", prompt, [], 4)  # the whole prompt cached: its last block is not
    assert again is not None and again.cached_tokens == 8 and again.pages[:2] == pages[:2]
    assert pool.refs(pages[0]) == 2
    partial = cache.admit("a@1", [*prompt[:6], 1, 2, 3, 4, 5], [], 3)  # diverges in block 2
    assert partial is not None and partial.cached_tokens == 4
    for req in (got, again, partial):
        pool.release(req.pages)
    assert pool.idle == 3 and pool.free == 32
    check_pool(pool)

    def sample(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    assert sample("lorafleet_shard_prefix_lookups_total", adapter="a", result="hit") == 3
    assert sample("lorafleet_shard_prefix_lookups_total", adapter="a", result="miss") == 2
    assert sample("lorafleet_shard_prefix_lookups_total", adapter="<base>", result="miss") == 1
    assert sample("lorafleet_shard_prefix_hit_tokens_total", adapter="a") == 12 + 8 + 4
    assert (
        sample("lorafleet_shard_prefix_prompt_tokens_total", adapter="a") == 12 + 13 + 14 + 12 + 11
    )
    assert sample("lorafleet_shard_prefix_cached_pages") == 3
    assert sample("lorafleet_shard_prefix_idle_pages") == 3


def test_a_full_pool_reclaims_idle_cached_pages_and_forgets_their_blocks() -> None:
    metrics = ShardMetrics()
    cache = make_cache(6, metrics=metrics)
    pool = cache.pool
    old = list(range(8))
    computed(cache, "a@1", old)  # blocks 0 and 1 kept, the third page freed
    assert pool.kept == 2 and pool.free == 6
    held = pool.alloc(5)  # 4 free + 1 reclaimed: the second block (released before the first)
    assert held is not None and cache.blocks == 1
    assert metrics.registry.get_sample_value("lorafleet_shard_prefix_evicted_pages_total") == 1
    got = cache.admit("a@1", [*old, 9], [], 3)  # only the first block is still there
    assert got is None  # 1 hit + 2 fresh does not fit: nothing is held then
    first_page = cache.index.page_of[chain("a@1", old)[0]]
    assert pool.idle == 1 and pool.refs(first_page) == 0
    pool.release(held)
    got = cache.admit("a@1", [*old, 9], [], 3)
    assert got is not None and got.cached_tokens == 4 and got.pages[0] == first_page
    pool.release(got.pages)
    check_pool(pool)


def test_a_retired_version_drops_its_blocks_and_is_not_added_again() -> None:
    current = {"a@1": True, "a@2": True}
    metrics = ShardMetrics()
    cache = make_cache(16, lambda key: current.get(key, True), metrics)
    pool = cache.pool
    prompt = list(range(50, 58))
    computed(cache, "a@1", prompt)
    computed(cache, "a@2", prompt)
    running = cache.admit("a@1", [*prompt, 1], [], 3)  # a request still on the old version
    assert running is not None and running.cached_tokens == 8
    current["a@1"] = False
    cache.index.retire("a@1")  # from another thread: applied at the next sync
    assert cache.blocks == 4
    cache.sync()
    assert cache.blocks == 2 and pool.kept == 2
    assert metrics.registry.get_sample_value("lorafleet_shard_prefix_retired_pages_total") == 2
    # The old request finishes on its pages; they are freed, not kept, and not added again.
    assert cache.insert("a@1", chain("a@1", [*prompt, 1]), running.pages, 0, 2) == 2
    pool.release(running.pages)
    assert pool.kept == 2 and pool.free == 16 and pool.idle == 2
    assert cache.admit("a@1", [*prompt, 1], [], 3).cached_tokens == 0  # type: ignore[union-attr]
    check_pool(pool)


def test_a_duplicate_block_stays_with_its_request() -> None:
    """Two requests with one prompt prefilled side by side: the second's pages are not kept."""
    cache = make_cache(8)
    pool = cache.pool
    prompt = list(range(9))
    one, two = cache.admit("", prompt, [], 3), cache.admit("", prompt, [], 3)
    assert one is not None and two is not None and one.cached_tokens == two.cached_tokens == 0
    hashes = chain("", prompt)
    cache.insert("", hashes, one.pages, 0, 2)
    cache.insert("", hashes, two.pages, 0, 2)
    assert pool.kept == 2 and cache.blocks == 2
    pool.release(two.pages)
    pool.release(one.pages)
    assert pool.idle == 2 and pool.free == 8
    check_pool(pool)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_storm_of_admissions_and_releases_keeps_every_page_accounted(seed: int) -> None:
    """Random requests over a few shared prefixes and adapter versions, admitted, computed in
    random steps, released in random order (finish, cancel, evict alike), with retirements:
    refcounts never go negative, every page is free, held or idle-kept, hits only ever return
    pages of the same version and block, and at the end every page is free or idle-kept."""
    rng = random.Random(seed)
    cache = make_cache(40)
    pool = cache.pool
    prefixes = [[rng.randrange(500) for _ in range(rng.randrange(4, 14))] for _ in range(4)]
    keys = ["", "a@1", "a@2", "b@1"]
    owner: dict[int, bytes] = {}  # page -> the block key its content was computed for
    live: list[tuple[str, list[bytes], list[int], int]] = []  # key, hashes, pages, computed
    for _ in range(600):
        if live and (rng.random() < 0.45 or pool.free < 8):
            key, hashes, pages, done = live.pop(rng.randrange(len(live)))
            cache.insert(key, hashes, pages, 0, min(done // PAGE, len(hashes)))
            pool.release(pages)
        elif rng.random() < 0.03:
            cache.index.retire(rng.choice(keys[1:]))
            cache.sync()
        else:
            key = rng.choice(keys)
            tokens = rng.choice(prefixes) + [rng.randrange(500) for _ in range(rng.randrange(6))]
            hashes: list[bytes] = []
            got = cache.admit(key, tokens, hashes, pages_for(len(tokens) + 1, PAGE))
            if got is None:
                continue
            assert got.cached_tokens < len(tokens)
            for block in range(got.cached_tokens // PAGE):
                assert owner[got.pages[block]] == hashes[block]  # same version, same tokens
            for block, page in enumerate(got.pages):
                if block >= got.cached_tokens // PAGE and block < len(hashes):
                    owner[page] = hashes[block]  # this request computes it
            done = rng.randrange(got.cached_tokens, len(tokens) + 1)
            live.append((key, hashes, got.pages, done))
        check_pool(pool)
    for key, hashes, pages, done in live:
        cache.insert(key, hashes, pages, 0, min(done // PAGE, len(hashes)))
        pool.release(pages)
    check_pool(pool)
    assert pool.free == pool.total and pool.idle == pool.kept == cache.blocks


def test_prefix_keys_follow_their_first_block_and_stay_bounded() -> None:
    """A request's prefix key is reported while the first block of its chain is cached: from
    the insert (or the hit) on, until that block is reclaimed or retired; past the bound, the
    least recently used key goes. The reported set is a new object only after a change."""
    cache = make_cache(6)
    pool = cache.pool
    cache.keys.max_keys = 2
    prompt = list(range(8))
    hashes = chain("a@1", prompt)
    cache.note_key(101, hashes)  # nothing cached yet: not reported
    assert cache.keys.current == frozenset()
    computed(cache, "a@1", prompt)
    cache.note_key(101, hashes)
    cache.note_key(102, chain("a@1", [*prompt[:4], 9, 9, 9, 9]))  # shares the first block
    reported = cache.keys.current
    assert reported == {101, 102} and cache.keys.current is reported
    cache.note_key(101, hashes)  # used again: 102 is now the least recently used
    cache.note_key(103, hashes)
    assert cache.keys.current == {101, 103}
    held = pool.alloc(6)  # reclaims both blocks, the first one last
    assert held is not None and cache.blocks == 0 and cache.keys.current == frozenset()
    pool.release(held)
    current = {"a@1": True}
    retiring = make_cache(6, lambda key: current["a@1"])
    computed(retiring, "a@1", prompt)
    retiring.note_key(101, hashes)
    current["a@1"] = False
    retiring.index.retire("a@1")
    retiring.sync()
    assert retiring.keys.current == frozenset()


def test_the_pool_must_tell_the_caches_index_of_reclaimed_pages() -> None:
    """A pool that reclaims pages behind the index's back would leave blocks pointing at pages
    that hold other tokens: such a cache is refused when it is made."""
    index = BlockIndex()
    with pytest.raises(ValueError, match=r"on_reclaim=index\.reclaimed"):
        PrefixCache(PagePool(4), index, PAGE)
    with pytest.raises(ValueError, match=r"on_reclaim=index\.reclaimed"):
        PrefixCache(PagePool(4, BlockIndex().reclaimed), index, PAGE)
    assert PrefixCache(PagePool(4, index.reclaimed), index, PAGE).blocks == 0
