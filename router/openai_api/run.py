"""One Generate call on the router's proxy path, its chunks read as an async iterator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from starlette.requests import Request

from protos import generate_pb2
from router.edge import RequestFailed
from router.openai_api.errors import ApiError, from_status
from router.server import GeneratorService

log = structlog.get_logger("router.openai_api")

_END = object()


class _Feed:
    """The `Client` the proxy writes to. Unbounded: a request's chunks are bounded by its
    max_tokens, and the proxy never waits on a slow HTTP reader."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()

    async def write(self, chunk: generate_pb2.GenerateResponse) -> None:
        self.queue.put_nowait(chunk)

    def time_remaining(self) -> float | None:
        return None


class Run:
    """Starts `service.generate(request)` at once; `chunks()` yields what it streams."""

    def __init__(
        self, service: GeneratorService, request: generate_pb2.GenerateRequest, model: str
    ) -> None:
        self._feed = _Feed()
        self._error: ApiError | None = None
        self._model = model
        self._task = asyncio.create_task(self._generate(service, request))

    async def _generate(
        self, service: GeneratorService, request: generate_pb2.GenerateRequest
    ) -> None:
        try:
            await service.generate(request, self._feed)
        except RequestFailed as failure:
            self._error = from_status(failure.code, failure.details, self._model)
        except asyncio.CancelledError:
            self._error = ApiError(499, "the client went away")
            raise
        except Exception:
            log.exception("HTTP request failed")
            self._error = ApiError(500, "internal error in the router; see its log")
        finally:
            self._feed.queue.put_nowait(_END)

    async def chunks(self) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """The streamed chunks, in order; raises ApiError when the call failed."""
        while True:
            item = await self._feed.queue.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            yield item  # type: ignore[misc]

    def cancel(self) -> None:
        """Ends the call (the shard frees the request's KV pages); harmless when done."""
        self._task.cancel()

    async def collect(self, request: Request) -> list[generate_pb2.GenerateResponse]:
        """Every chunk; cancels the call when the HTTP client disconnects first."""
        watcher = asyncio.create_task(self._cancel_on_disconnect(request))
        try:
            return [chunk async for chunk in self.chunks()]
        finally:
            watcher.cancel()

    async def _cancel_on_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        log.info("HTTP client disconnected; cancelling its request")
        self.cancel()
