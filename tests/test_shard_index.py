"""The placement index answers exactly what the pure rules answer, through any update sequence."""

from __future__ import annotations

import random

import pytest

from router.config import Policy
from router.policy import RULES, Demand, ShardLoad, statefulset_ordinal
from router.shard_index import ShardIndex

ADAPTERS = ("a", "b", "c", "d")
PREFIXES = (11, 12, 13)


def _random_load(rng: random.Random, name: str, page_sizes: tuple[int, ...]) -> ShardLoad:
    max_batch = rng.choice((2, 4, 8))
    running = rng.randint(0, max_batch)
    queued = rng.choice((0, 0, 0, 1, 2))
    total = rng.choice((6, 12, 12, 40))  # mixed pool sizes: some cannot hold every request
    free = rng.randint(0, total)
    return ShardLoad(
        shard=name,
        running=running,
        max_batch_size=max_batch,
        kv_pages_free=free,
        kv_pages_total=total,
        kv_page_size=rng.choice(page_sizes),
        queued=queued,
        kv_pages_queued=rng.randint(0, free) if queued else 0,
        adapters_resident=frozenset(a for a in ADAPTERS if rng.random() < 0.4),
        draining=rng.random() < 0.1,
        ordinal=statefulset_ordinal(name),
        prefix_keys=frozenset(k for k in PREFIXES if rng.random() < 0.3),
    )


def _names(rng: random.Random, count: int) -> list[str]:
    # StatefulSet pods (ordinals that sort differently as text) mixed with bare addresses.
    names = [f"lorafleet-shard-{i}.svc:50061" for i in rng.sample(range(40), count // 2)]
    return names + [f"10.0.0.{i}:50061" for i in range(count - len(names))]


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("residency_first", [False, True])
@pytest.mark.parametrize("page_sizes", [(16,), (1, 16, 64)])
def test_index_agrees_with_the_rule(policy, residency_first, page_sizes):
    rng = random.Random(f"{policy}{residency_first}{page_sizes}")
    rule = RULES[policy]
    index = ShardIndex(policy, residency_first)
    names = _names(rng, 24)
    loads: dict[str, ShardLoad] = {}
    for step in range(1500):
        name = rng.choice(names)
        action = rng.random()
        if action < 0.08:
            loads.pop(name, None)
            index.remove(name)
        elif action < 0.14:
            loads.pop(name, None)
            index.update(name, None)  # known, not placeable (stale, unhealthy)
        else:
            loads[name] = _random_load(rng, name, page_sizes)
            index.update(name, loads[name])
        context = rng.choice((0, 10, 40, 150))
        longest = rng.choice((0, context + 20, context + 300, 5000))
        key = rng.choice((None, None, *PREFIXES))  # None: prefix affinity off
        demand = Demand(rng.choice(("", *ADAPTERS)), context, longest, key)
        expected = rule(list(loads.values()), demand, residency_first)
        assert index.place(demand) == expected, (step, demand)


def test_ties_go_to_the_lowest_ordinal_not_the_smallest_name():
    names = ["lorafleet-shard-10:50061", "lorafleet-shard-2:50061", "10.0.0.1:50061"]
    for policy in Policy:
        index = ShardIndex(policy)
        for name in names:
            ordinal = statefulset_ordinal(name)
            index.update(name, ShardLoad(name, 0, 8, 100, 100, 16, ordinal=ordinal))
        assert index.place(Demand("a", 5)) == "lorafleet-shard-2:50061"
        index.update(names[1], None)
        assert index.place(Demand("a", 5)) == "lorafleet-shard-10:50061"


@pytest.mark.parametrize(
    ("name", "ordinal"),
    [
        ("lorafleet-shard-3", 3),
        ("lorafleet-shard-3:50061", 3),
        ("lorafleet-shard-12.lorafleet-shard.default.svc.cluster.local:50061", 12),
        ("10.0.0.3:50061", None),
        ("[::1]:50061", None),
        ("s1", None),
        ("shard-", None),
    ],
)
def test_statefulset_ordinal(name, ordinal):
    assert statefulset_ordinal(name) == ordinal


@pytest.mark.parametrize("policy", list(Policy))
def test_a_request_goes_to_a_shard_whose_pool_can_hold_it(policy):
    # An idle shard whose whole pool is too small must not take the request while a busy one
    # with room in a big enough pool can; once no pool can hold the estimate, an idle one may.
    small = ShardLoad("small", 0, 8, 8, 8, 4)  # 32 tokens
    big = ShardLoad("big", 3, 8, 50, 100, 4)  # 400 tokens, 200 free
    for place in (RULES[policy], _index_rule(policy)):
        assert place([small, big], Demand("", 10, 60), False) == "big"
        assert place([small, big], Demand("", 10, 20), False) in ("small", "big")
        full = ShardLoad("big", 3, 8, 2, 100, 4)
        assert place([small, full], Demand("", 10, 60), False) is None  # wait for big
        assert place([small, full], Demand("", 10, 900), False) == "small"  # the shard judges


def _index_rule(policy):
    def place(loads, demand, residency_first):
        index = ShardIndex(policy, residency_first)
        for load in loads:
            index.update(load.shard, load)
        return index.place(demand)

    return place
