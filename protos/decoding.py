"""Requests that do not parse get INVALID_ARGUMENT, not grpc's UNKNOWN with a Python traceback.

grpc lets a server choose the status only where its own deserializer runs: this interceptor
wraps each method's deserializer so a malformed message (bad UTF-8 in a string field, a broken
varint) reaches the handler as `Undecodable`, which answers INVALID_ARGUMENT naming the method.
Shared by the router and the shards (both serve `lorafleet.v1.Generator`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError


class Undecodable:
    """Stands in for a request message that failed to parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as err:
            return Undecodable(str(err))

    return parse


def _details(method: str, bad: Undecodable) -> str:
    return (
        f"{method}: the request message does not parse ({bad.reason[:200]}); string fields "
        "must hold valid UTF-8 and the bytes must be a serialized protobuf message"
    )


# A grpc method handler of any request and response types (the stubs' generic; at run time
# grpc's class takes no parameters, hence a string).
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class InvalidArgumentOnDecodeError(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT to requests that do not parse, for every unary-request method."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Handler] = {}  # by method: built once

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return handler
            wrapped = self._wrapped[details.method] = _wrap(details.method, handler)
        return wrapped


def _wrap(method: str, handler: Handler) -> Handler:
    # grpc.aio's handler is a namedtuple (`_replace`) of coroutine functions, which the type
    # stubs' RpcMethodHandler (sync callables) does not describe.
    aio: Any = handler
    if handler.request_deserializer is None or handler.request_streaming:
        return handler
    parse = _lenient(handler.request_deserializer)
    if handler.unary_stream is not None:
        inner = aio.unary_stream
        if inspect.isasyncgenfunction(inner):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(method, request))
                # aclosing: a client gone mid-stream closes the handler's generator at once.
                async with contextlib.aclosing(inner(request, context)) as messages:
                    async for message in messages:
                        yield message

            return aio._replace(request_deserializer=parse, unary_stream=stream)

        async def writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(method, request))
            return await inner(request, context)

        return aio._replace(request_deserializer=parse, unary_stream=writer)
    if handler.unary_unary is not None:
        unary = aio.unary_unary

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(method, request))
            return await unary(request, context)

        return aio._replace(request_deserializer=parse, unary_unary=call)
    return handler
