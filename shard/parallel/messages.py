"""What rank 0 broadcasts to its followers, one message per turn: a step plan to run, a
heartbeat, an adapter version to hold, or None (exit)."""

from __future__ import annotations

from dataclasses import dataclass

from shard.engine.step_plan import StepPlan


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Rank 0 is alive; nothing to run."""


HEARTBEAT = Heartbeat()


@dataclass(frozen=True, slots=True)
class Hold:
    """Rank 0 has adapter version `key` on its device and claims it for a request once every
    follower answers that it holds the same version; followers let go of held versions that
    are neither `key` nor in `keep` (rank 0 no longer has them on its device)."""

    key: str  # id@version
    keep: tuple[str, ...]  # id@version


Message = StepPlan | Heartbeat | Hold | None
