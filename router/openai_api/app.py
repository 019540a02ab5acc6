"""The FastAPI application: routes, OpenAI-shaped answers and server-sent event streams."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from protos import generate_pb2
from router.edge import RequestFailed
from router.openai_api import convert
from router.openai_api.convert import Envelope
from router.openai_api.errors import ApiError, from_status
from router.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from router.openai_api.run import Run
from router.server import GeneratorService

_DONE = "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Models:
    """The base model's name (asked of a shard once) and what a request's `model` means."""

    def __init__(self, service: GeneratorService) -> None:
        self._service = service
        self._base: str | None = None

    async def base(self) -> str:
        if self._base is None:
            try:
                self._base = (await self._service.info()).model
            except RequestFailed as failure:
                raise from_status(failure.code, failure.details, "") from None
        return self._base

    async def adapter_id(self, model: str) -> str:
        """'' for the base model's name, else `model` as an adapter id."""
        return "" if model == await self.base() else model


def build_app(service: GeneratorService) -> FastAPI:
    """The OpenAI-compatible API over `service` (the router's gRPC Generator)."""
    app = FastAPI(title="lorafleet", docs_url=None, redoc_url=None, openapi_url=None)
    models = _Models(service)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = f"{where or 'body'}: {first['msg']}"
        return await api_error(request, ApiError(400, message, param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return await api_error(request, ApiError(err.status_code, str(err.detail)))

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        try:
            info = await service.info()
            listed = await service.adapters()
        except RequestFailed as failure:
            raise from_status(failure.code, failure.details, "") from None

        def entry(model_id: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": model_id,
                "object": "model",
                "created": started,
                "owned_by": "lorafleet",
                "root": model_id,
                "parent": parent,
                "max_model_len": info.max_context,
            }

        adapters = sorted({a.adapter_id for a in listed.adapters})
        data = [entry(info.model, None), *(entry(a, info.model) for a in adapters)]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        grpc_request = convert.chat_request(body, await models.adapter_id(body.model))
        run = Run(service, grpc_request, body.model)
        envelope = Envelope.new("chatcmpl", "chat.completion", body.model)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return await _stream(run, _chat_events(envelope, run, usage, body.logprobs))
        chunks = await run.collect(request)
        last = chunks[-1]
        message = {"role": "assistant", "content": "".join(c.text for c in chunks)}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": convert.chat_logprobs(chunks) if body.logprobs else None,
            "finish_reason": convert.finish_reason(last),
        }
        return envelope.wrap(choices=[choice], usage=convert.usage(last))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        grpc_request = convert.completion_request(body, await models.adapter_id(body.model))
        run = Run(service, grpc_request, body.model)
        envelope = Envelope.new("cmpl", "text_completion", body.model)
        logprobs = body.logprobs is not None
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return await _stream(run, _completion_events(envelope, run, usage, logprobs))
        chunks = await run.collect(request)
        choice = {
            "index": 0,
            "text": "".join(c.text for c in chunks),
            "logprobs": convert.completion_logprobs(chunks) if logprobs else None,
            "finish_reason": convert.finish_reason(chunks[-1]),
        }
        return envelope.wrap(choices=[choice], usage=convert.usage(chunks[-1]))

    return app


async def _stream(run: Run, events: AsyncIterator[str]) -> StreamingResponse:
    """Waits for the first event, so an error before any token gets its HTTP status; then
    streams the rest. A client that disconnects cancels the call."""
    try:
        first = await anext(events)
    except ApiError:
        run.cancel()
        raise

    async def body() -> AsyncIterator[str]:
        try:
            yield first
            async for event in events:
                yield event
        finally:
            run.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _chat_events(
    envelope: Envelope, run: Run, include_usage: bool, logprobs: bool
) -> AsyncIterator[str]:
    """`chat.completion.chunk` events: the role, content deltas, the finish, usage, [DONE].
    The first chunk waits for the first token, so a failure before it raises ApiError."""
    envelope = Envelope(envelope.id, "chat.completion.chunk", envelope.created, envelope.model)
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], reason: str | None, lp: Any = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return _event(envelope.wrap(choices=[choice], **extra))

    chunks = run.chunks()
    first = await anext(chunks)
    yield chunk({"role": "assistant", "content": ""}, None)
    try:
        async for c in _prepend(first, chunks):
            reason = convert.finish_reason(c)
            if c.text or (logprobs and c.token_ids):
                lp = convert.chat_logprobs([c]) if logprobs else None
                yield chunk({"content": c.text}, None, lp)
            if reason is not None:
                yield chunk({}, reason)
                if include_usage:
                    yield _event(envelope.wrap(choices=[], usage=convert.usage(c)))
    except ApiError as err:
        yield _event(err.body())
    yield _DONE


async def _completion_events(
    envelope: Envelope, run: Run, include_usage: bool, logprobs: bool
) -> AsyncIterator[str]:
    """`text_completion` events: text deltas, the last with its finish, usage, [DONE]."""
    extra = {"usage": None} if include_usage else {}
    chunks = run.chunks()
    first = await anext(chunks)
    offset = 0
    try:
        async for c in _prepend(first, chunks):
            reason = convert.finish_reason(c)
            lp = convert.completion_logprobs([c], offset) if logprobs else None
            offset += len(c.text)
            choice = {"index": 0, "text": c.text, "logprobs": lp, "finish_reason": reason}
            yield _event(envelope.wrap(choices=[choice], **extra))
            if reason is not None and include_usage:
                yield _event(envelope.wrap(choices=[], usage=convert.usage(c)))
    except ApiError as err:
        yield _event(err.body())
    yield _DONE


async def _prepend(
    first: generate_pb2.GenerateResponse, rest: AsyncIterator[generate_pb2.GenerateResponse]
) -> AsyncIterator[generate_pb2.GenerateResponse]:
    yield first
    async for item in rest:
        yield item
