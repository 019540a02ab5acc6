"""Placement: pure functions that pick a shard for a request from the shards' load snapshots.

Nothing here does I/O or knows protobuf; `router.shards` converts snapshots at the edge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router.config import Policy

# A StatefulSet pod is named `<set>-<ordinal>`; its hostname or first DNS label carries that name.
_ORDINAL = re.compile(r"^[A-Za-z0-9-]*?-(\d+)$")


def statefulset_ordinal(name: str) -> int | None:
    """The StatefulSet ordinal in a pod name, hostname, DNS name or `host:port`, else None.

    `lorafleet-shard-3`, `lorafleet-shard-3:50061` and `lorafleet-shard-3.lorafleet-shard.ns.svc`
    all give 3; IP addresses and names without a `-N` suffix give None.
    """
    host = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    match = _ORDINAL.match(host.split(".", 1)[0])
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class ShardLoad:
    """One shard's load as the router currently believes it (snapshot + optimistic accounting)."""

    # Router-side key of the shard: the host:port it dials.
    shard: str
    # Requests in the running batch.
    running: int
    # Most requests the running batch may hold.
    max_batch_size: int
    # Free KV pages.
    kv_pages_free: int
    # KV pages in the pool.
    kv_pages_total: int
    # Tokens per KV page.
    kv_page_size: int
    # Requests waiting on the shard for admission.
    queued: int = 0
    # KV pages the queued requests' prompts need.
    kv_pages_queued: int = 0
    # Adapters resident in device memory.
    adapters_resident: frozenset[str] = field(default_factory=frozenset)
    # The shard stopped taking new requests (Drain or shutdown).
    draining: bool = False
    # StatefulSet ordinal of the shard's pod, None when its name carries none.
    ordinal: int | None = None
    # Prefix keys (`protos.prefix_key`) of the prefixes the shard's prefix cache holds; empty
    # unless the router asked for them (prefix affinity on).
    prefix_keys: frozenset[int] = field(default_factory=frozenset)

    @property
    def tie_key(self) -> tuple[bool, int, str]:
        """Order among otherwise equal shards: lowest StatefulSet ordinal, then the address.

        A scale-in removes the highest ordinals, so consolidation keeps them the idlest.
        """
        return (self.ordinal is None, self.ordinal or 0, self.shard)

    @property
    def occupancy(self) -> int:
        """Requests holding or waiting for a slot in the running batch."""
        return self.running + self.queued

    @property
    def kv_pages_available(self) -> int:
        """Free KV pages not already promised to the shard's queued requests."""
        return max(0, self.kv_pages_free - self.kv_pages_queued)

    def holds(self, adapter_id: str) -> bool:
        """True when the adapter is resident (the base model always is)."""
        return not adapter_id or adapter_id in self.adapters_resident

    def holds_prefix(self, prefix_key: int | None) -> bool:
        """True when the shard's prefix cache holds the prefix of that key."""
        return prefix_key is not None and prefix_key in self.prefix_keys


@dataclass(frozen=True, slots=True)
class Demand:
    """What a request needs from a shard, known before tokenization."""

    adapter_id: str
    # Upper bound on the prompt's tokens, plus tokens already generated when resuming.
    context_tokens: int
    # Upper bound on prompt + max_new_tokens: the most KV the request can ever hold (0: unknown,
    # then the context plus one token).
    longest_tokens: int = 0
    # `protos.prefix_key` of the request when placement prefers shards holding its prefix
    # (prefix affinity); None: no preference.
    prefix_key: int | None = None

    @property
    def longest(self) -> int:
        """Tokens of KV the request may hold at its end."""
        return max(self.context_tokens + 1, self.longest_tokens)

    def pages(self, page_size: int) -> int:
        """KV pages to admit the request: its context plus the first generated token.

        Output pages beyond the first are not reserved: the shard grows page tables as requests
        decode and migrates its newest request when the pool runs out, which is cheaper than
        reserving max_new_tokens up front for requests that usually stop early.
        """
        return math.ceil((self.context_tokens + 1) / max(1, page_size))


def holds_whole(load: ShardLoad, demand: Demand) -> bool:
    """The shard's whole KV pool can hold the request at its longest."""
    return demand.longest <= load.kv_pages_total * max(1, load.kv_page_size)


def fits(load: ShardLoad, demand: Demand, idle_fits: bool = True) -> bool:
    """The shard takes requests, has a batch slot, and has KV pages for the request.

    Shards that are not SERVING or have no live snapshot have no load at all: `router.shards`
    leaves them out. With `idle_fits`, an idle shard fits any request: the estimate is an upper
    bound and only the shard itself can tell whether the prompt fits its context, so it answers
    INVALID_ARGUMENT instead of the request waiting forever.
    """
    if load.draining or load.occupancy >= load.max_batch_size:
        return False
    if idle_fits and load.occupancy == 0:
        return True
    return demand.pages(load.kv_page_size) <= load.kv_pages_available


def candidates(loads: Sequence[ShardLoad], demand: Demand) -> list[ShardLoad]:
    """Shards that fit the request. While some open shard's whole pool can hold the request at
    its longest, only such shards count, and only with room now: a request never goes to a shard
    that must refuse it while another could serve it. Otherwise (the estimate exceeds every
    pool) idle shards fit, and the shard itself judges the exact token count."""
    if any(not load.draining and holds_whole(load, demand) for load in loads):
        return [
            load
            for load in loads
            if holds_whole(load, demand) and fits(load, demand, idle_fits=False)
        ]
    return [load for load in loads if fits(load, demand)]


def consolidation_level(load: ShardLoad, ordered: bool = False) -> float:
    """A shard's rank in consolidation, lower first: busy shards by occupancy (busiest first),
    idle shards last (0). With `ordered`, busy StatefulSet shards share the best level (-inf) and
    go lowest ordinal first, ahead of the other busy shards.

    Punica's busiest-first keeps feeding whichever shards happen to be busiest as load falls, so
    the shards that drain are scattered across ordinals, while a scale-in removes the highest
    ordinals. Filling the busy shards of a StatefulSet in ordinal order drains the highest ones
    instead; an idle shard is still woken only when no busy one has room.
    """
    if ordered and load.occupancy and load.ordinal is not None:
        return -math.inf
    return float(-load.occupancy)


def consolidate(
    loads: Sequence[ShardLoad], demand: Demand, residency_first: bool = False, ordered: bool = False
) -> str | None:
    """Punica's rule: the busiest shard that still fits, so batches grow and idle shards stay
    idle. With `ordered` (`--policy consolidate-ordered`), busy shards of a StatefulSet go lowest
    ordinal first instead, ahead of shards without an ordinal (see `consolidation_level`).

    Ties go to a shard holding the request's prefix (prefix affinity: it never outranks batch
    size, so it cannot wake an idle shard while a busy one has room), then to one holding the
    adapter, then to the lowest StatefulSet ordinal, then to the smallest shard id
    (deterministic). Ordered, busy StatefulSet shards have no ties: in the fleet simulation,
    preferring the adapter's holders among them kept high ordinals busy on partial batches (full
    batches fell from 49% to 41% of GPU time), and a prefix's holders would pin them the same
    way. With `residency_first`, holding the adapter outranks batch size.
    """

    def key(load: ShardLoad) -> tuple[int, float, int, int, int, tuple[bool, int, str]]:
        resident = int(load.holds(demand.adapter_id))
        prefix = int(load.holds_prefix(demand.prefix_key))
        level = consolidation_level(load, ordered)
        order = load.ordinal if level == -math.inf and load.ordinal is not None else 0
        if residency_first:
            return (-resident, level, order, -prefix, 0, load.tie_key)
        return (0, level, order, -prefix, -resident, load.tie_key)

    fitting = candidates(loads, demand)
    return min(fitting, key=key).shard if fitting else None


def least_loaded(
    loads: Sequence[ShardLoad], demand: Demand, residency_first: bool = False
) -> str | None:
    """The shard with the emptiest batch (as a fraction of its max batch) that fits.

    Ties go to a shard holding the request's prefix, then to one holding the adapter, then to
    the most available KV pages, then to the lowest StatefulSet ordinal and the smallest shard
    id. With `residency_first`, holding the adapter outranks batch fill.
    """

    def key(load: ShardLoad) -> tuple[float, float, int, int, tuple[bool, int, str]]:
        resident = -int(load.holds(demand.adapter_id))
        prefix = -int(load.holds_prefix(demand.prefix_key))
        fill = load.occupancy / load.max_batch_size
        if residency_first:
            return (resident, fill, prefix, -load.kv_pages_available, load.tie_key)
        return (fill, prefix, resident, -load.kv_pages_available, load.tie_key)

    fitting = candidates(loads, demand)
    return min(fitting, key=key).shard if fitting else None


def consolidate_ordered(
    loads: Sequence[ShardLoad], demand: Demand, residency_first: bool = False
) -> str | None:
    """`consolidate` with the busy shards of a StatefulSet filled lowest ordinal first."""
    return consolidate(loads, demand, residency_first, ordered=True)


PlacementRule = Callable[[Sequence[ShardLoad], Demand, bool], str | None]

RULES: dict[Policy, PlacementRule] = {
    Policy.CONSOLIDATE: consolidate,
    Policy.CONSOLIDATE_ORDERED: consolidate_ordered,
    Policy.LEAST_LOADED: least_loaded,
}
