"""Placement at fleet scale: the rules of `router.policy`, answered from an incremental index.

`policy.consolidate` and `policy.least_loaded` scan every shard per request (1.6 ms at 1,000
shards). This index answers the same question in O(L + log n) for n shards and L distinct batch
levels (at most max batch + 1):

- Every shard with a load has a fixed position in tie order (lowest StatefulSet ordinal, then
  address). Positions change only when a shard joins or its ordinal becomes known; the index is
  then rebuilt once, lazily, at the next placement.
- Placeable shards (not draining, batch not full) sit in one max-tree per batch level
  (`policy.consolidation_level` for consolidate: occupancy, and for consolidate-ordered one
  level for all busy StatefulSet shards first; fill for least-loaded) whose leaves hold the KV
  room in tokens. The policy's best level whose tree's root fits the request holds the answer,
  and a descent finds its first fitting position in O(log n). Idle shards fit any request (as in
  `policy.fits`), so their leaves sit above every possible demand.
- Residency breaks ties: a set of shards per (adapter, level). It is read only when the level's
  first fitting shard lacks the adapter, and costs O(shards of that level holding the adapter).
  Under consolidate-ordered, busy StatefulSet shards have no ties: their level's first fitting
  position is the answer (with `residency_first`, its first fitting holder of the adapter).
- Prefix affinity breaks ties before residency: a set of shards per prefix key, whatever their
  level (keys change far less often than levels). It is read only when the demand has a key and
  the level's first fitting shard lacks it or the adapter, and costs O(min(shards holding the
  key, shards of the level)).
- Whole pools (as in `policy.candidates`): while an open shard's pool can hold the request at its
  longest, idle shards need real room too, and a pick whose pool is too small is hidden and the
  question asked again (only in a fleet of mixed pool sizes; O(log n) per hidden shard).

Updates (a snapshot, a reservation, a release) move one shard between levels: O(log n) for the
trees plus O(adapters resident on it) for the residency sets. Under
consolidate-ordered, a busy StatefulSet shard whose batch grows or shrinks stays in its level:
O(log n).
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Collection

from router.config import Policy
from router.policy import Demand, ShardLoad, consolidation_level

# Above any demand in tokens: an idle shard fits every request (the shard itself refuses a prompt
# that is too long for it).
_IDLE = 1 << 62
_EMPTY = -1
# The level of busy StatefulSet shards under consolidate-ordered (`policy.consolidation_level`),
# best of all.
_ORDERED = -math.inf


class _MaxTree:
    """Max over positions 0..size-1, with the leftmost position whose value reaches a bound."""

    __slots__ = ("size", "t")

    def __init__(self, size: int):
        self.size = size
        self.t = [_EMPTY] * (2 * size)  # t[1] is the root, t[size + pos] the leaves

    def set(self, pos: int, value: int) -> None:
        t = self.t
        i = pos + self.size
        t[i] = value
        i >>= 1
        while i:
            left, right = t[2 * i], t[2 * i + 1]
            best = left if left >= right else right
            if t[i] == best:
                return  # nothing above changes
            t[i] = best
            i >>= 1

    def first_at_least(self, bound: int) -> int:
        """Leftmost position with value >= bound; the caller checked the root reaches it."""
        t = self.t
        i, size = 1, self.size
        while i < size:
            i <<= 1
            if t[i] < bound:
                i += 1
        return i - size


class _Entry:
    """One shard's place in the index."""

    __slots__ = ("address", "level", "load", "pool", "pos", "prefix", "resident", "tie", "value")

    def __init__(self, address: str):
        self.address = address
        self.load: ShardLoad | None = None
        self.tie: tuple[bool, int, str] | None = None
        self.pos = -1
        # Batch level while placeable, else None; value = KV room in tokens (or _IDLE + room).
        self.level: float | None = None
        self.value = _EMPTY
        self.resident: frozenset[str] = frozenset()
        self.prefix: frozenset[int] = frozenset()  # prefix keys, counted in `_prefix_holders`
        self.pool = 0  # tokens the whole KV pool holds; counted in `_pools` while open


class ShardIndex:
    """Believed shard loads, indexed for one placement policy; `place` agrees with the rule."""

    def __init__(self, policy: Policy, residency_first: bool = False):
        self._consolidate = policy in (Policy.CONSOLIDATE, Policy.CONSOLIDATE_ORDERED)
        self._ordered = policy is Policy.CONSOLIDATE_ORDERED
        self._residency_first = residency_first
        self._entries: dict[str, _Entry] = {}
        self._by_pos: list[_Entry | None] = []
        self._size = 1
        self._dirty = False
        self._trees: dict[float, _MaxTree] = {}
        self._levels: list[float] = []  # keys of _trees, best first
        self._members: dict[float, set[_Entry]] = collections.defaultdict(set)
        self._holding: dict[tuple[str, float], set[_Entry]] = collections.defaultdict(set)
        self._prefix_holders: dict[int, set[_Entry]] = {}
        self._page_sizes: collections.Counter[int] = collections.Counter()
        self._pools: collections.Counter[int] = collections.Counter()  # open shards' pool sizes

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, address: str, load: ShardLoad | None) -> None:
        """Records a shard's believed load; None takes it out of placement (it stays known)."""
        e = self._entries.get(address)
        if e is None:
            e = self._entries[address] = _Entry(address)
        if e.load is not None:
            self._page_sizes[e.load.kv_page_size] -= 1
            if not e.load.draining:
                self._pools[e.pool] -= 1
        e.load = load
        self._set_prefix(e, load.prefix_keys if load is not None else frozenset())
        if load is None:
            self._move(e, None, _EMPTY, frozenset())
            return
        self._page_sizes[load.kv_page_size] += 1
        e.pool = load.kv_pages_total * max(1, load.kv_page_size)
        if not load.draining:
            self._pools[e.pool] += 1
        if load.tie_key != e.tie:
            e.tie = load.tie_key
            self._dirty = True
        if load.draining or load.occupancy >= load.max_batch_size:
            self._move(e, None, _EMPTY, frozenset())
            return
        room = load.kv_pages_available * max(1, load.kv_page_size)
        if self._consolidate:
            level = consolidation_level(load, self._ordered)
        else:
            level = load.occupancy / load.max_batch_size
        self._move(e, level, room + _IDLE if load.occupancy == 0 else room, load.adapters_resident)

    def remove(self, address: str) -> None:
        """Forgets a shard."""
        e = self._entries.get(address)
        if e is None:
            return
        self.update(address, None)
        del self._entries[address]
        if not self._dirty and e.pos >= 0:
            self._by_pos[e.pos] = None

    def largest_pool(self) -> int:
        """Tokens the largest whole KV pool among open (not draining) shards holds; 0: none."""
        return max(+self._pools, default=0)

    def place(self, demand: Demand) -> str | None:
        """The shard the policy picks for `demand`, or None when none fits."""
        if self._dirty:
            self._rebuild()
        longest = demand.longest
        if longest > self.largest_pool():
            return self._place(demand, idle_fits=True)
        hidden: list[tuple[_Entry, int]] = []
        try:
            while (address := self._place(demand, idle_fits=False)) is not None:
                e = self._entries[address]
                if e.pool >= longest:
                    return address
                hidden.append((e, e.value))  # its pool is too small: ask again without it
                self._set_value(e, _EMPTY)
            return None
        finally:
            for e, value in reversed(hidden):
                self._set_value(e, value)

    def _set_value(self, e: _Entry, value: int) -> None:
        assert e.level is not None  # only a placed shard is hidden and shown again
        self._trees[e.level].set(e.pos, value)
        e.value = value

    def _place(self, demand: Demand, idle_fits: bool) -> str | None:
        need = demand.context_tokens + 1
        adapter = demand.adapter_id
        if self._residency_first and adapter:
            for level in self._levels:
                bound = self._bound(level, need, idle_fits)
                if self._trees[level].t[1] >= bound:
                    best = self._best(self._holding.get((adapter, level)), bound)
                    if best is not None:
                        if level == _ORDERED:
                            return best.address  # lowest ordinal: no ties to break
                        if demand.prefix_key is not None and demand.prefix_key not in best.prefix:
                            best = self._prefix_best(demand, level, bound, True) or best
                        return best.address
        for level in self._levels:
            tree = self._trees[level]
            top = tree.t[1]
            need_here = self._bound(level, need, idle_fits)
            if top < need_here:
                continue
            if self._consolidate:
                winner = self._by_pos[tree.first_at_least(need_here)]
            elif len(+self._page_sizes) == 1:
                # Most room first: with one page size, room in tokens orders like room in pages.
                winner = self._by_pos[tree.first_at_least(top)]
            else:
                winner = self._best(self._members[level], need_here)
            assert winner is not None
            if level == _ORDERED:
                return winner.address  # busy StatefulSet shards: lowest ordinal, no ties
            key = demand.prefix_key
            lacks_adapter = bool(adapter) and adapter not in winner.resident
            if (
                key is not None
                and (key not in winner.prefix or lacks_adapter)
                and (chosen := self._prefix_best(demand, level, need_here, False))
            ):
                return chosen.address
            if lacks_adapter:
                winner = self._best(self._holding.get((adapter, level)), need_here) or winner
            return winner.address
        return None

    def _prefix_best(
        self, demand: Demand, level: float, need: int, resident_only: bool
    ) -> _Entry | None:
        """The policy's pick among the shards of `level` that hold the demand's prefix and fit
        `need`: those holding its adapter too first (only those with `resident_only`)."""
        key = demand.prefix_key
        assert key is not None
        holders = self._prefix_holders.get(key)
        if not holders:
            return None
        # The smaller side of (holders of the key) x (shards of the level): a key held across
        # the fleet costs the level's shards, a level crowded with shards the key's holders.
        members = self._members[level]
        if len(holders) <= len(members):
            here = [e for e in holders if e.level == level and e.value >= need]
        else:
            here = [e for e in members if key in e.prefix and e.value >= need]
        adapter = demand.adapter_id
        if adapter:
            resident = [e for e in here if adapter in e.resident]
            if (best := self._best(resident, need)) is not None or resident_only:
                return best
        return self._best(here, need)

    def _set_prefix(self, e: _Entry, keys: frozenset[int]) -> None:
        """Records a shard's prefix keys (O(keys) when they changed, O(1) when not)."""
        old = e.prefix
        if keys is old:
            return
        for key in old - keys:
            holders = self._prefix_holders[key]
            holders.discard(e)
            if not holders:
                del self._prefix_holders[key]
        for key in keys - old:
            self._prefix_holders.setdefault(key, set()).add(e)
        e.prefix = keys

    def _bound(self, level: float, need: int, idle_fits: bool) -> int:
        """The leaf value a shard of `level` needs: idle shards' leaves carry _IDLE on top of
        their room, so without the idle exception they need that much more."""
        return need if idle_fits or level != 0.0 else need + _IDLE

    def _best(self, entries: Collection[_Entry] | None, need: int) -> _Entry | None:
        """The policy's pick among `entries` (all of one level) that fit `need` tokens."""
        if not entries:
            return None
        fitting = [e for e in entries if e.value >= need]
        if not fitting:
            return None
        if self._consolidate:
            return min(fitting, key=lambda e: e.pos)
        return min(fitting, key=lambda e: (-_pages_available(e), e.pos))

    def _move(self, e: _Entry, level: float | None, value: int, resident: frozenset[str]) -> None:
        old_level, old_resident = e.level, e.resident
        if level != old_level or resident is not old_resident:
            if old_level is not None:
                self._members[old_level].discard(e)
                for adapter in old_resident:
                    self._holding[(adapter, old_level)].discard(e)
            if level is not None:
                if level not in self._trees:
                    self._trees[level] = _MaxTree(self._size)
                    bisect.insort(self._levels, level)
                self._members[level].add(e)
                for adapter in resident:
                    self._holding[(adapter, level)].add(e)
        if not self._dirty and e.pos >= 0:
            if old_level is not None and old_level != level:
                self._trees[old_level].set(e.pos, _EMPTY)
            if level is not None and (level != old_level or value != e.value):
                self._trees[level].set(e.pos, value)
        e.level, e.value, e.resident = level, value, resident

    def _rebuild(self) -> None:
        """New positions in tie order, and every tree refilled from its shards."""
        ranked = sorted((e for e in self._entries.values() if e.tie is not None), key=_tie)
        size = 1
        while size < len(ranked):
            size *= 2
        self._size = size
        self._by_pos = [None] * size
        for pos, e in enumerate(ranked):
            e.pos = pos
            self._by_pos[pos] = e
        self._trees = {level: _MaxTree(size) for level in self._levels}
        for e in ranked:
            if e.level is not None:
                self._trees[e.level].set(e.pos, e.value)
        self._dirty = False


def _pages_available(e: _Entry) -> int:
    """KV pages free for new requests of a placed shard (every placed shard has a load)."""
    return e.load.kv_pages_available if e.load is not None else 0


def _tie(e: _Entry) -> tuple[bool, int, str]:
    assert e.tie is not None
    return e.tie
