"""A request's domain description and its mutable state inside the engine."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shard.engine.detokenizer import TextStream
from shard.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from shard.model.lora_weights import AdapterWeights


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"


class MigrationReason(enum.Enum):
    KV_EXHAUSTED = "kv_exhausted"
    DRAINING = "draining"


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"


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

    # The engine's key: unique among live requests (the edge makes one per call).
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
    # The caller's request_id, a label for logs only: callers may reuse it.
    client_label: str = ""
    # `protos.prefix_key` of the request as the client sent it; None: its input is too short.
    prefix_key: int | None = None

    @property
    def label(self) -> str:
        """How logs and error messages name the request."""
        return self.client_label or self.request_id


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    queue_time_s: float
    time_to_first_token_s: float
    migrations: int
    cached_prompt_tokens: int = 0  # prompt tokens the prefix cache held at first admission


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
    error: BaseException | None = None  # the request failed (e.g. its adapter did not load)

    @property
    def final(self) -> bool:
        return self.finish is not None or self.migration is not None or self.error is not None


# Where a request's outputs go, called from the engine thread (what it returns is ignored).
Sink = Callable[[StepOutput], object]


class Sequence:
    """A request inside the engine (hot, mutable state; engine thread only)."""

    def __init__(
        self,
        req: EngineRequest,
        sink: Sink,
        text: TextStream,
    ) -> None:
        resumed = req.resume.generated_ids if req.resume else ()
        self.req = req
        self.sink = sink
        self.text = text
        self.token_ids: list[int] = [*req.prompt_ids, *resumed]
        self.generated: list[int] = list(resumed)
        self.num_cached = 0  # tokens whose keys and values are in the KV pages
        self.pages: list[int] = []  # the first ones may be shared: cached prefix blocks
        self.block_hashes: list[bytes] = []  # prefix-cache keys of its full blocks at admission
        self.blocks_indexed = 0  # its blocks before this one are in the prefix cache (or skipped)
        self.prefix_hit = 0  # tokens its last admission found in the prefix cache
        # Prompt tokens its first admission here found cached (a preempted request that finds
        # its own chunks again on re-admission does not count them: they were prefilled).
        self.prompt_cached = 0
        self.status = SeqStatus.WAITING
        self.holds_adapter = False
        self.adapter_key = ""  # the adapter version it runs on (id@version), set at admission
        # That version's device weights, claimed with it by the scheduler (None: base model).
        self.adapter_weights: AdapterWeights | None = None
        self.first_scheduled: float | None = None
        self.first_token: float | None = None

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def adapter_id(self) -> str:
        return self.req.adapter_id

    @property
    def new_tokens(self) -> int:
        """Rows this sequence adds to the next forward."""
        return len(self.token_ids) - self.num_cached

    def usage(self) -> Usage:
        resume = self.req.resume
        start = self.first_scheduled if self.first_scheduled is not None else time.monotonic()
        queue = start - self.req.arrival + (resume.queue_time_s if resume else 0.0)
        if resume and resume.generated_ids:
            ttft = resume.time_to_first_token_s
        elif self.first_token is not None:
            ttft = self.first_token - self.req.arrival
        else:
            ttft = 0.0
        return Usage(
            prompt_tokens=len(self.req.prompt_ids),
            generated_tokens=len(self.generated),
            queue_time_s=queue,
            time_to_first_token_s=ttft,
            migrations=resume.migrations if resume else 0,
            cached_prompt_tokens=self.prompt_cached,
        )
