"""What the router's two edges (gRPC `Generate` and the OpenAI HTTP API) share with the proxy
path behind them: where a stream's chunks go, and how a call ends with a status."""

from __future__ import annotations

from typing import Protocol

import grpc

from protos import generate_pb2


class Client(Protocol):
    """Where a Generate stream goes: a gRPC servicer context, or another edge's writer."""

    async def write(self, chunk: generate_pb2.GenerateResponse) -> None:
        """Sends one chunk; waits while the client reads slower than tokens come."""

    def time_remaining(self) -> float | None:
        """Seconds left of the client's deadline; None without one."""


class RequestFailed(Exception):
    """Ends a Generate call with a status; raised where the reason is known."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_hint: bool = False):
        super().__init__(details)
        self.code = code
        self.details = details
        self.retry_hint = retry_hint
