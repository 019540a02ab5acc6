"""Placement cost at fleet scale: the router's index against the pure rule's full scan.

A fleet of N shards in steady state (about 70% of batch slots taken, Zipf adapter popularity,
a few adapters resident per shard); each arrival is placed and reserved on the chosen shard, each
departure releases a slot, exactly as the router's optimistic accounting does. Timed per
placement: the index's answer (`place_us`) and the index update the reservation causes
(`update_us`); `placement_us` is both together, what the router pays per request.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time

from router.config import Policy
from router.policy import RULES, Demand, ShardLoad
from router.shard_index import ShardIndex

MAX_BATCH = 32
KV_PAGES = 2048
PAGE_SIZE = 16
RESIDENT_PER_SHARD = 8


def zipf_weights(count: int, exponent: float) -> list[float]:
    """Popularity of adapters 0..count-1 under Zipf's law."""
    return [1.0 / (rank + 1) ** exponent for rank in range(count)]


def _fleet(rng: random.Random, shards: int, adapters: int) -> dict[str, ShardLoad]:
    weights = zipf_weights(adapters, 1.1)
    fleet = {}
    for i in range(shards):
        name = f"lorafleet-shard-{i}.lorafleet-shard:50061"
        resident = frozenset(
            f"adapter-{a}" for a in rng.choices(range(adapters), weights, k=RESIDENT_PER_SHARD)
        )
        fleet[name] = ShardLoad(
            name, 0, MAX_BATCH, KV_PAGES, KV_PAGES, PAGE_SIZE, adapters_resident=resident, ordinal=i
        )
    return fleet


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 2),
        "mean": round(statistics.fmean(ordered), 2),
    }


def run(
    shards: int,
    policy: Policy = Policy.CONSOLIDATE,
    requests: int = 20_000,
    adapters: int = 1000,
    fill: float = 0.7,
    seed: int = 0,
    compare_rule: bool = False,
) -> dict[str, object]:
    """Times `requests` placements on a fleet of `shards`; with `compare_rule`, also the scan."""
    rng = random.Random(seed)
    fleet = _fleet(rng, shards, adapters)
    index = ShardIndex(policy)
    for name, load in fleet.items():
        index.update(name, load)
    weights = zipf_weights(adapters, 1.1)
    running: list[tuple[str, int]] = []  # (shard, pages) of requests placed so far
    target = int(fill * shards * MAX_BATCH)
    place_us, update_us, rule_us = [], [], []
    mismatches = unplaced = 0
    rule = RULES[policy]

    def depart() -> None:
        name, pages = running.pop(rng.randrange(len(running)))
        load = fleet[name]
        fleet[name] = load = dataclasses.replace(
            load, running=load.running - 1, kv_pages_free=load.kv_pages_free + pages
        )
        index.update(name, load)

    def arrive(name: str, pages: int) -> float:
        """Reserves a slot on `name`; returns the seconds the index update took."""
        load = fleet[name]
        fleet[name] = load = dataclasses.replace(
            load, running=load.running + 1, kv_pages_free=load.kv_pages_free - pages
        )
        start = time.perf_counter()
        index.update(name, load)
        seconds = time.perf_counter() - start
        running.append((name, pages))
        return seconds

    def demand() -> Demand:
        adapter = f"adapter-{rng.choices(range(adapters), weights)[0]}"
        return Demand(adapter, rng.randint(64, 1024))

    while len(running) < target:  # warm-up to the steady state, untimed
        d = demand()
        name = index.place(d)
        if name is None:
            break
        arrive(name, d.pages(PAGE_SIZE))
    for _ in range(requests):
        if len(running) >= target:
            depart()
        d = demand()
        start = time.perf_counter()
        name = index.place(d)
        place_us.append((time.perf_counter() - start) * 1e6)
        if compare_rule:
            start = time.perf_counter()
            expected = rule(list(fleet.values()), d, False)
            rule_us.append((time.perf_counter() - start) * 1e6)
            mismatches += expected != name
        if name is None:
            unplaced += 1
            update_us.append(0.0)
            continue
        update_us.append(arrive(name, d.pages(PAGE_SIZE)) * 1e6)
    total = [p + u for p, u in zip(place_us, update_us, strict=True)]
    result: dict[str, object] = {
        "shards": shards,
        "policy": policy.value,
        "requests": requests,
        "adapters": adapters,
        "slots_taken": round(len(running) / (shards * MAX_BATCH), 3),
        "placement_p50_us": _percentiles(total)["p50"],
        "placement_us": _percentiles(total),
        "place_us": _percentiles(place_us),
        "update_us": _percentiles(update_us),
        "unplaced": unplaced,
    }
    if compare_rule:
        result["rule_scan_us"] = _percentiles(rule_us)
        result["rule_disagreements"] = mismatches
    return result
