"""Placement rules over tables of shard snapshots (pure functions, no I/O)."""

from __future__ import annotations

import random

import pytest

from router.config import Policy
from router.policy import (
    RULES,
    Demand,
    ShardLoad,
    consolidate,
    consolidate_ordered,
    fits,
    least_loaded,
)


def shard(
    name: str,
    running: int = 0,
    max_batch: int = 8,
    free: int = 100,
    *,
    queued: int = 0,
    pages_queued: int = 0,
    resident: tuple[str, ...] = (),
    draining: bool = False,
    page_size: int = 16,
    prefixes: tuple[int, ...] = (),
) -> ShardLoad:
    return ShardLoad(
        shard=name,
        running=running,
        max_batch_size=max_batch,
        kv_pages_free=free,
        kv_pages_total=100,
        kv_page_size=page_size,
        queued=queued,
        kv_pages_queued=pages_queued,
        adapters_resident=frozenset(resident),
        draining=draining,
        prefix_keys=frozenset(prefixes),
    )


SMALL = Demand("a", context_tokens=10)  # 1 page of 16 tokens


@pytest.mark.parametrize(
    ("context_tokens", "page_size", "pages"),
    [(0, 16, 1), (15, 16, 1), (16, 16, 2), (31, 16, 2), (32, 16, 3), (100, 1, 101), (5, 0, 6)],
)
def test_pages_cover_context_plus_first_token(context_tokens, page_size, pages):
    assert Demand("a", context_tokens).pages(page_size) == pages


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        # The busiest shard that still has a slot wins: batches grow, idle shards stay idle.
        ([shard("s1", 1), shard("s2", 5), shard("s3", 3)], "s2"),
        # A full batch is skipped; the next busiest takes it.
        ([shard("s1", 1), shard("s2", 8), shard("s3", 3)], "s3"),
        # Queued requests count toward the batch.
        ([shard("s1", 4), shard("s2", 2, queued=3)], "s2"),
        ([shard("s1", 4), shard("s2", 2, queued=6)], "s1"),
        # Different max batch sizes: fullness is judged per shard.
        ([shard("s1", 7, max_batch=7), shard("s2", 6, max_batch=16)], "s2"),
        # A draining shard is excluded even when it is the busiest.
        ([shard("s1", 6, draining=True), shard("s2", 2)], "s2"),
        # All idle: the smallest id, deterministically.
        ([shard("s3"), shard("s1"), shard("s2")], "s1"),
        # Equal batches: the shard holding the adapter.
        ([shard("s1", 3), shard("s2", 3, resident=("a",))], "s2"),
        # ... but residency does not outrank a bigger batch by default.
        ([shard("s1", 4), shard("s2", 3, resident=("a",))], "s1"),
    ],
)
def test_consolidate_picks_the_busiest_shard_that_fits(table, expected):
    assert consolidate(table, SMALL) == expected


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        # Needs 4 pages: the busiest shard has 3 free, so the next one.
        ([shard("s1", 5, free=3), shard("s2", 2, free=50)], "s2"),
        ([shard("s1", 5, free=4), shard("s2", 2, free=50)], "s1"),
        # Pages promised to the shard's own queue are not available.
        ([shard("s1", 5, free=10, pages_queued=7), shard("s2", 2)], "s2"),
        ([shard("s1", 5, free=10, pages_queued=6), shard("s2", 2)], "s1"),
        # Page size matters: 50 tokens in 64-token pages is one page.
        ([shard("s1", 5, free=1, page_size=64), shard("s2", 2)], "s1"),
    ],
)
def test_consolidate_needs_kv_pages_for_the_request(table, expected):
    assert consolidate(table, Demand("a", context_tokens=50)) == expected


def test_an_idle_shard_fits_any_request():
    # The estimate is an upper bound; only the shard can refuse a prompt for being too long.
    huge = Demand("a", context_tokens=10_000)
    assert fits(shard("s1", 0, free=3), huge)
    assert not fits(shard("s1", 1, free=3), huge)
    assert not fits(shard("s1", 0, free=3, draining=True), huge)


@pytest.mark.parametrize(
    "table",
    [
        [],
        [shard("s1", 8), shard("s2", 8)],
        [shard("s1", 4, draining=True), shard("s2", 1, draining=True)],
        [shard("s1", 1, free=0), shard("s2", 3, free=2, pages_queued=2)],
        [shard("s1", 0, queued=8)],
    ],
)
@pytest.mark.parametrize("rule", [consolidate, least_loaded])
def test_none_when_no_shard_fits(table, rule):
    assert rule(table, SMALL) is None
    assert rule(table, SMALL, True) is None


def test_residency_first_outranks_batch_size():
    table = [shard("s1", 6), shard("s2", 1, resident=("a", "b")), shard("s3", 2, resident=("a",))]
    assert consolidate(table, SMALL) == "s1"
    assert consolidate(table, SMALL, residency_first=True) == "s3"
    # Nobody holds it: back to the busiest.
    assert consolidate(table, Demand("z", 1), residency_first=True) == "s1"


def test_prefix_affinity_breaks_ties_but_never_outranks_batch_size():
    """A request with a prefix key goes to a shard holding its prefix among the shards the
    policy ranks equal (even over residency and ordinal), never to a less busy one; without a
    key (affinity off) the pick is the one the rule makes without prefixes."""
    with_key, without = Demand("a", 10, prefix_key=7), Demand("a", 10)
    table = [shard("s1", 3, resident=("a",)), shard("s2", 3, prefixes=(7,)), shard("s3", 3)]
    assert consolidate(table, with_key) == least_loaded(table, with_key) == "s2"
    assert consolidate(table, without) == least_loaded(table, without) == "s1"
    # Idle shards tie too: the one holding the prefix wakes up, not the lowest ordinal.
    idle = [shard("s1"), shard("s2", prefixes=(7,))]
    assert consolidate(idle, with_key) == "s2" and consolidate(idle, without) == "s1"
    # A busier shard wins over the prefix holder (consolidation first); an emptier one under
    # least-loaded.
    busier = [shard("s1", 5), shard("s2", 3, prefixes=(7,)), shard("s3", 1)]
    assert consolidate(busier, with_key) == "s1" and least_loaded(busier, with_key) == "s3"
    # A prefix holder without room is passed over; residency_first ranks residency, then batch
    # size, then the prefix.
    full = [shard("s1", 3, prefixes=(7,), free=0), shard("s2", 3)]
    assert consolidate(full, with_key) == "s2"
    ranked = [shard("s1", 5, prefixes=(7,)), shard("s2", 2, resident=("a",))]
    ranked.append(shard("s3", 2, resident=("a",), prefixes=(7,)))
    assert consolidate(ranked, with_key, residency_first=True) == "s3"
    assert consolidate(ranked, without, residency_first=True) == "s2"


def test_base_model_counts_as_resident_everywhere():
    table = [shard("s1", 3), shard("s2", 3, resident=("a",))]
    assert consolidate(table, Demand("", 1)) == "s1"
    assert consolidate(table, Demand("", 1), residency_first=True) == "s1"


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ([shard("s1", 5), shard("s2", 1), shard("s3", 3)], "s2"),
        # Fill is relative to each shard's max batch: 4/16 < 2/4.
        ([shard("s1", 2, max_batch=4), shard("s2", 4, max_batch=16)], "s2"),
        ([shard("s1", 1, draining=True), shard("s2", 5)], "s2"),
        # Equal fill: the shard holding the adapter, then the most free pages.
        ([shard("s1", 2), shard("s2", 2, resident=("a",))], "s2"),
        ([shard("s1", 2, free=10), shard("s2", 2, free=90)], "s2"),
        ([shard("s1", 2, free=90, pages_queued=85), shard("s2", 2, free=10)], "s2"),
        # The emptiest shard lacks pages.
        ([shard("s1", 0, free=100), shard("s2", 1, free=0)], "s1"),
        ([shard("s1", 3, free=50), shard("s2", 1, free=0)], "s1"),
    ],
)
def test_least_loaded_picks_the_emptiest_shard_that_fits(table, expected):
    assert least_loaded(table, SMALL) == expected


def test_least_loaded_residency_first():
    table = [shard("s1", 0), shard("s2", 6, resident=("a",))]
    assert least_loaded(table, SMALL) == "s1"
    assert least_loaded(table, SMALL, residency_first=True) == "s2"


@pytest.mark.parametrize("rule", [consolidate, least_loaded])
def test_skewed_burst_fills_shards_in_policy_order(rule):
    # Replays optimistic accounting: each placement adds one request to the chosen shard.
    table = {name: shard(name, 0, max_batch=4) for name in ("s1", "s2", "s3")}
    order = []
    for i in range(12):
        name = rule(list(table.values()), Demand("abc"[i % 3], 1))
        order.append(name)
        load = table[name]
        table[name] = shard(name, load.running + 1, max_batch=4, free=load.kv_pages_free - 1)
    assert rule(list(table.values()), SMALL) is None
    if rule is consolidate:
        assert order == ["s1"] * 4 + ["s2"] * 4 + ["s3"] * 4
    else:
        assert order == ["s1", "s2", "s3"] * 4


def test_rules_cover_every_policy():
    assert set(RULES) == set(Policy)


def pod(ordinal: int, running: int, resident: tuple[str, ...] = ()) -> ShardLoad:
    """A StatefulSet shard (its ordinal known), max batch 8."""
    name = f"lorafleet-shard-{ordinal}"
    return ShardLoad(
        name, running, 8, 100, 100, 16, adapters_resident=frozenset(resident), ordinal=ordinal
    )


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        # Punica's rule: the busiest StatefulSet shard with room, whatever its ordinal ...
        ([pod(0, 2), pod(1, 6), pod(2, 0)], "lorafleet-shard-1"),
        ([pod(3, 7), pod(0, 2)], "lorafleet-shard-3"),
        # ... and among equally busy ones the lowest ordinal, so high ordinals tend to idle.
        ([pod(2, 4), pod(1, 4), pod(0, 0)], "lorafleet-shard-1"),
        ([pod(3, 0), pod(2, 0)], "lorafleet-shard-2"),
    ],
)
def test_consolidate_is_busiest_first_with_ordinal_ties(table, expected):
    assert consolidate(table, SMALL) == expected


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        # Busy StatefulSet shards fill lowest ordinal first, not busiest first ...
        ([pod(0, 2), pod(1, 6), pod(2, 0)], "lorafleet-shard-0"),
        ([pod(0, 8), pod(1, 6), pod(2, 1)], "lorafleet-shard-1"),
        # ... but an idle shard still waits while a busy one has room, whatever its ordinal.
        ([pod(0, 0), pod(1, 0), pod(5, 7)], "lorafleet-shard-5"),
        ([pod(0, 8), pod(1, 8), pod(3, 0), pod(2, 0)], "lorafleet-shard-2"),
        # Among busy StatefulSet shards, holding the adapter does not pull a request upward
        # (that would keep high ordinals busy); among idle ones it still breaks the tie.
        ([pod(0, 2), pod(1, 6, resident=("a",))], "lorafleet-shard-0"),
        ([pod(0, 8), pod(1, 0), pod(2, 0, resident=("a",))], "lorafleet-shard-2"),
        # Shards without an ordinal keep Punica's busiest-first, after the StatefulSet's.
        ([shard("s1", 1), shard("s2", 5), pod(4, 1)], "lorafleet-shard-4"),
        ([shard("s1", 1), shard("s2", 5), pod(4, 8)], "s2"),
    ],
)
def test_consolidate_ordered_fills_statefulset_shards_in_ordinal_order(table, expected):
    assert consolidate_ordered(table, SMALL) == expected


def test_ordered_consolidation_drains_the_highest_ordinals_first_as_load_falls():
    # Four shards half full; a random request finishes each step, and fewer arrive until the
    # load fits two shards: the new ones go to the lowest ordinals, so the highest ones drain.
    rng = random.Random(7)
    requests = [i for i in range(4) for _ in range(4)]  # the shard of each running request
    for step in range(300):
        requests.pop(rng.randrange(len(requests)))
        if len(requests) < 8 or step % 2:
            table = [pod(i, requests.count(i)) for i in range(4)]
            requests.append(int(consolidate_ordered(table, SMALL).rsplit("-", 1)[1]))
    assert sorted(set(requests)) == [0] and len(requests) == 8
