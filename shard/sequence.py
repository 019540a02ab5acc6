"""A request's domain description and its mutable state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from shard.sampling import SamplingParams


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"


class MigrationReason(enum.Enum):
    KV_EXHAUSTED = "kv_exhausted"
    DRAINING = "draining"


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class StopParams:
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class Resume:
    """State of a request that began on another shard."""

    generated_ids: tuple[int, ...]
    queue_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    migrations: int = 0


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A validated request, free of protobuf."""

    request_id: str
    adapter_id: str  # "" is the base model
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StopParams
    return_logprobs: bool = False
    resume: Resume | None = None
    # A migratable request leaves the shard when KV runs out (the router re-places it); any
    # other request is preempted and recomputed here later.
    migratable: bool = False
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    queue_time_s: float
    time_to_first_token_s: float
    migrations: int


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one request gets from one engine step (or from its end)."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[float, ...] = ()
    finish: FinishReason | None = None
    usage: Usage | None = None
    migration: MigrationReason | None = None
    generated_ids: tuple[int, ...] = ()  # all generated so far, set with `migration`
    error: Exception | None = None  # the request failed (e.g. its adapter could not be loaded)

    @property
    def final(self) -> bool:
        return self.finish is not None or self.migration is not None or self.error is not None
