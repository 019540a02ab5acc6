"""What other threads ask of the engine thread: one frozen message type per kind of request.

The engine's public methods put these on its inbox; the engine thread takes them between steps
and dispatches on the type.
"""

from __future__ import annotations

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
