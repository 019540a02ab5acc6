"""What other threads ask of the engine thread: one frozen message type per kind of request.

The engine's public methods put these on its inbox; the engine thread takes them between steps
and dispatches on the type. The inbox is made before the engine, so that a part built before it
(the tensor-parallel plan channel, which the engine's executor sends through) can report a
process-wide fault to it.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

from shard.engine.sequence import EngineRequest, Sink


@dataclass(frozen=True, slots=True)
class Submit:
    """Admit a request; its outputs go to `sink`, called from the engine thread."""

    req: EngineRequest
    sink: Sink


@dataclass(frozen=True, slots=True)
class Cancel:
    """End a request (its client went away); everything it holds is freed."""

    request_id: str  # the engine's id of the request


@dataclass(frozen=True, slots=True)
class Drain:
    """The shard drains: every waiting migratable request migrates now."""


@dataclass(frozen=True, slots=True)
class Evacuate:
    """The drain's time is up: every running migratable request migrates now."""


@dataclass(frozen=True, slots=True)
class Fail:
    """The engine is dead (a tensor-parallel rank is gone): the loop raises `error`, which ends
    every stream with it."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class Wake:
    """Nothing to do: wakes a loop blocked on an empty inbox so that it sees it must stop."""


Message = Submit | Cancel | Drain | Evacuate | Fail | Wake


class Inbox(queue.Queue[Message]):
    """The engine thread's messages, put from any thread, and the fault that ended the engine."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: BaseException | None = None  # the first process-wide fault

    def fail(self, exc: BaseException) -> None:
        """Marks the engine dead from another thread (a tensor-parallel rank is gone): `failure`
        is set at once, and the step loop, if it is not stuck in a collective, raises `exc`,
        which ends every stream with it."""
        if self.failure is None:
            self.failure = exc
        self.put(Fail(exc))
