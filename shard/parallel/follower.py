"""Ranks 1..N-1: replay the step plans rank 0 broadcasts, and hold the adapter versions it
claims."""

from __future__ import annotations

import time

import structlog

from shard.adapters.cache import AdapterCache
from shard.adapters.loader import AdapterError, AdapterErrorKind
from shard.engine.step_plan import Step, StepPlan
from shard.model.lora_weights import AdapterWeights
from shard.parallel.group import GroupLost, broadcast_object, destroy, gather_object
from shard.parallel.messages import Hold
from shard.parallel.rank import RankState
from shard.parallel.shutdown import abandon

log = structlog.get_logger(__name__)


class Holds:
    """A follower's adapter versions held for rank 0: one reference each in its cache, so its
    own LRU never evicts, and a reload never drops, a version that a running request uses."""

    def __init__(self, adapters: AdapterCache, timeout_s: float) -> None:
        self.adapters = adapters
        self.timeout_s = timeout_s  # below the group timeout: rank 0 waits for the answer
        self.held: dict[str, AdapterWeights] = {}  # id@version -> its weights on this rank

    def replicate(self, msg: Hold) -> AdapterError | None:
        """Holds `msg.key` (the error if this rank cannot: e.g. the files now hold another
        version) and lets go of what rank 0 no longer keeps."""
        for key in self.held.keys() - {msg.key, *msg.keep}:
            del self.held[key]
            self.adapters.release(key)
        if msg.key in self.held:
            return None
        deadline = time.monotonic() + self.timeout_s
        state = self.adapters.wait_resident(msg.key, deadline, claim=True)
        if state is None:
            return AdapterError(
                AdapterErrorKind.EXHAUSTED,
                f"adapter {msg.key!r} did not become resident within {self.timeout_s:.0f} s",
            )
        if isinstance(state, AdapterError):
            return state
        self.held[msg.key] = state.weights
        return None

    def step(self, plan: StepPlan) -> Step:
        """The plan with this rank's weights of its segments' versions. Rank 0 puts only
        versions every rank holds into a plan; anything else is a bug."""
        missing = set(plan.adapters) - self.held.keys()
        if missing:
            raise RuntimeError(
                f"step plan names adapter versions this rank does not hold: {missing}"
            )
        return Step(plan, tuple(self.held[key] if key else None for _, key in plan.segments))


def replay(state: RankState, hold_timeout_s: float) -> None:
    """Runs what rank 0 broadcasts until it sends None, then exits the process; a lost group
    exits it with status 1."""
    group = state.group
    holds = Holds(state.adapters, hold_timeout_s)
    try:
        while (msg := broadcast_object(None, group)) is not None:
            if isinstance(msg, Hold):
                gather_object(holds.replicate(msg), group)
            elif isinstance(msg, StepPlan):
                state.runner.forward(holds.step(msg))
    except GroupLost:
        log.exception("tensor-parallel group lost: rank 0 is gone or silent", rank=group.rank)
        abandon()
    destroy(group)
    abandon(0)  # nothing left to finalize that could block the exit
