"""Continuous batching: which requests run in the next forward.

Every step holds one decode token of each running request plus at most `max_prefill_tokens`
prompt tokens (the per-step token budget): first the next chunks of running requests whose
prompts are partly prefilled, in admission order, then new requests in FCFS order while the
budget, the batch limit and the free KV pages allow. A prompt longer than what is left of the
budget is prefilled in chunks over several steps, so a long prompt never stalls the running
streams for more than one budget's worth of rows. A request takes the KV pages of its whole
prompt when it is admitted, so a partly prefilled request never waits for pages.

A request is admitted only once its adapter is resident; one whose adapter is still loading waits
without holding up the others. When a running request needs a page and none is free, the newest
request is evicted, partly prefilled or not: its pages go back to the pool and it starts over
from its first token (it keeps its adapter version, so it resumes on the same weights).

With the prefix cache, an admitted request first takes the cached pages of the longest prefix
of full blocks that an earlier request of its adapter version computed, and is prefilled from
there. At the start of every step, and when a request leaves or is evicted, the full blocks its
prefill has computed so far are added to the cache, so a request that starts over after an
eviction finds its own finished chunks again.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from shard.adapters.cache import AdapterCache
from shard.adapters.loader import AdapterError
from shard.adapters.tiers import Resident
from shard.engine.kv_cache import PagePool, pages_for
from shard.engine.prefix_cache import PrefixCache
from shard.engine.sequence import SeqStatus, Sequence
from shard.engine.step_plan import Chunk


@dataclass(slots=True)
class Schedule:
    """The outcome of one scheduling decision."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    evicted: list[Sequence] = field(default_factory=list)  # lost their KV pages this step
    failed: list[tuple[Sequence, AdapterError]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


# How long a request may wait for its adapter while later requests overtake it.
ADAPTER_WAIT_BARRIER_S = 2.0


class Scheduler:
    """FCFS admission with a per-step prompt-token budget; engine thread only."""

    def __init__(
        self,
        pool: PagePool,
        page_size: int,
        max_batch_size: int,
        max_prefill_tokens: int,
        adapters: AdapterCache,
        prefix: PrefixCache | None = None,
    ) -> None:
        """`prefix`: the prefix cache over `pool` (None: every prompt is prefilled whole)."""
        self.pool = pool
        self.prefix = prefix
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens  # prompt rows per step, over all chunks
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SeqStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def pages_waiting(self) -> int:
        return sum(pages_for(len(s.token_ids) + 1, self.page_size) for s in self.waiting)

    def schedule(self) -> Schedule:
        out = Schedule()
        self.adapters.want(self._wanted_adapters())
        if self.prefix is not None:
            self.prefix.sync()
            for seq in self.running:
                self._index(seq)
        partial = self._grow_running(out)
        budget = self.max_prefill_tokens
        for seq in partial:
            if budget == 0:
                break
            budget -= self._chunk(seq, budget, out)
        self._admit(out, budget)
        return out

    @staticmethod
    def _chunk(seq: Sequence, budget: int, out: Schedule) -> int:
        """Schedules the next chunk of `seq`'s uncached tokens within `budget`; its size."""
        rows = min(seq.new_tokens, budget)
        out.prefill.append(Chunk(seq, seq.num_cached + rows))
        return rows

    def _wanted_adapters(self) -> set[str]:
        """Adapters of waiting requests, in order, up to the first one past the wait barrier:
        copies made for requests behind it must not hold the room its adapter needs."""
        wanted: set[str] = set()
        now = time.monotonic()
        for seq in self.waiting:
            if not seq.adapter_id:
                continue
            wanted.add(seq.adapter_id)
            if not seq.holds_adapter and now - seq.req.arrival >= ADAPTER_WAIT_BARRIER_S:
                break
        return wanted

    def _grow_running(self, out: Schedule) -> list[Sequence]:
        """Gives each running request a page for its next token, evicting the newest if needed.
        Requests with one uncached token decode; the partly prefilled ones are returned, in
        admission order."""
        partial: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue  # evicted earlier in this loop
            need = pages_for(len(seq.token_ids), self.page_size) - len(seq.pages)
            while need > 0:
                got = self.pool.alloc(need)
                if got is not None:
                    seq.pages.extend(got)
                    break
                victim = self.running[-1]
                self._evict(victim)
                out.evicted.append(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                (out.decode if seq.new_tokens == 1 else partial).append(seq)
        return [s for s in partial if s.status is SeqStatus.RUNNING]

    def _admit(self, out: Schedule, budget: int) -> None:
        """Admits waiting requests in FCFS order. Each one looked at leaves the queue's front in
        O(1); those that stay (adapter still loading) go back in front, in order, at the end:
        one pass over a long queue, not a `remove` per admitted request. Each admitted request
        gets a first chunk of what is left of the step's `budget`."""
        waiting = self.waiting
        passed: list[Sequence] = []  # overtaken while their adapter loads; they keep their place
        while waiting and len(self.running) < self.max_batch_size and budget > 0:
            seq = waiting[0]
            claimed: Resident | None = None
            if seq.adapter_id and not seq.holds_adapter:
                state = self.adapters.claim(seq.adapter_id)
                if isinstance(state, AdapterError):
                    waiting.popleft()
                    out.failed.append((seq, state))
                    continue
                claimed = state
                if claimed is None:
                    if time.monotonic() - seq.req.arrival < ADAPTER_WAIT_BARRIER_S:
                        passed.append(waiting.popleft())
                        continue  # still loading: later requests may go ahead
                    # Waited too long: admit no one behind it, so the adapters of running
                    # requests fall idle and one can be evicted to make room for its adapter.
                    break
            # The prompt's pages now, plus room for the first generated token.
            need = pages_for(len(seq.token_ids) + 1, self.page_size)
            if not self._take_pages(seq, claimed.key if claimed else seq.adapter_key, need):
                if claimed is not None:
                    self.adapters.release(claimed.key)
                break
            waiting.popleft()
            if claimed is not None:
                seq.adapter_key = claimed.key
                seq.adapter_weights = claimed.weights
                seq.holds_adapter = True
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
            self.running.append(seq)
            budget -= self._chunk(seq, budget, out)
        waiting.extendleft(reversed(passed))

    def _take_pages(self, seq: Sequence, adapter_key: str, need: int) -> bool:
        """Gives a request being admitted `need` pages: with the prefix cache, the cached pages
        of its longest known prefix first (those tokens are not prefilled again)."""
        if self.prefix is None:
            got = self.pool.alloc(need)
            if got is None:
                return False
            seq.pages = got
            return True
        admission = self.prefix.admit(adapter_key, seq.token_ids, seq.block_hashes, need)
        if admission is None:
            return False
        seq.pages = admission.pages
        seq.num_cached = seq.prefix_hit = admission.cached_tokens
        if admission.cached_tokens and seq.req.prefix_key is not None:
            self.prefix.note_key(seq.req.prefix_key, seq.block_hashes)
        if seq.first_scheduled is None:
            seq.prompt_cached = min(admission.cached_tokens, len(seq.req.prompt_ids))
        return True

    def _index(self, seq: Sequence) -> None:
        """Adds the computed full blocks of a request's tokens at admission to the prefix
        cache (decoded tokens are not added: only what a prefill computed is shared)."""
        assert self.prefix is not None
        end = min(seq.num_cached // self.page_size, len(seq.block_hashes))
        if end > seq.blocks_indexed:
            first = seq.blocks_indexed
            seq.blocks_indexed = self.prefix.insert(
                seq.adapter_key, seq.block_hashes, seq.pages, first, end
            )
            if first == 0 and seq.req.prefix_key is not None:
                self.prefix.note_key(seq.req.prefix_key, seq.block_hashes)

    def _drop_pages(self, seq: Sequence) -> None:
        """Releases a request's pages; its computed blocks stay in the prefix cache."""
        if self.prefix is not None and seq.pages:
            self._index(seq)
        self.pool.release(seq.pages)
        seq.pages = []
        seq.blocks_indexed = 0

    def _evict(self, seq: Sequence) -> None:
        """Takes a running request out of the batch and frees its pages; it keeps its tokens and
        its adapter version (a reload meanwhile must not change its weights)."""
        if seq in self.running:
            self.running.remove(seq)
        self._drop_pages(seq)
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING

    def release(self, seq: Sequence) -> None:
        """Frees everything a request holds; it leaves the running batch."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._drop_pages(seq)
        if seq.holds_adapter:
            self.adapters.release(seq.adapter_key)
            seq.holds_adapter = False
            seq.adapter_weights = None
