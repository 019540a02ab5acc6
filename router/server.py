"""The router's public `Generator` service: places each request and proxies the shard's stream.

A request that a shard gives up (migration notice, UNAVAILABLE, dropped connection) is placed
again with every token already forwarded, so the client's stream continues with nothing lost or
repeated. Shard errors pass through with their status and message.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import grpc
import structlog

from protos import generate_pb2, generate_pb2_grpc, shard_pb2
from protos.prefix_key import prefix_key
from router.admission import Admission, QueueFull, QueueTimeout
from router.edge import Client, RequestFailed
from router.metrics import RouterMetrics
from router.policy import Demand
from router.request_checks import context_bound, problem
from router.shard_table import ShardTable
from router.shards import Reservation, ShardHandle

log = structlog.get_logger("router.server")

# Shard failures that mean "this shard cannot go on", not "this request is wrong".
_MIGRATABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
_MIGRATION_REASONS = {
    shard_pb2.MIGRATION_REASON_KV_EXHAUSTED: "kv_exhausted",
    shard_pb2.MIGRATION_REASON_DRAINING: "draining",
}
_SHARD_FAILED = "shard_failed"
# Seconds a fan-out call (ListAdapters, GetInfo) may take per shard.
_FANOUT_TIMEOUT_S = 5.0
# Metadata key of the router's own id of a call, on every shard call it makes.
CALL_ID_KEY = "lorafleet-call-id"
# Suggested client retry delay when the router turns a request away.
_RETRY_PUSHBACK_MS = "1000"
# Shards that may fail while serving one request: a request whose shard failed is placed once
# more, and a second failure ends it, so a request that kills shards cannot walk the fleet.
_MAX_SHARD_FAILURES = 2


@dataclass(slots=True)
class _Progress:
    """What the router has delivered for one request, across shards."""

    arrived: float
    token_ids: list[int] = field(default_factory=list)
    migrations: int = 0
    # Router-side wait before the first dispatch, and in total.
    first_queue_s: float = 0.0
    queued_s: float = 0.0
    first_token_s: float = 0.0
    last_write: float = 0.0
    # Shards that failed while serving the request (not counting migration notices).
    failed_on: list[str] = field(default_factory=list)
    # A shard admitted the request at least once (so its adapter id names a real adapter).
    accepted: bool = False

    def resume(self) -> shard_pb2.ResumeState:
        return shard_pb2.ResumeState(
            generated_token_ids=self.token_ids,
            queue_time_s=self.first_queue_s,
            time_to_first_token_s=self.first_token_s,
            migrations=self.migrations,
        )


class GeneratorService(generate_pb2_grpc.GeneratorServicer):
    """`lorafleet.v1.Generator` in front of the shard table."""

    def __init__(
        self,
        table: ShardTable,
        admission: Admission,
        metrics: RouterMetrics,
        max_migrations: int,
        prefix_affinity: bool = False,
    ):
        """`prefix_affinity`: placement prefers, among equally good shards, one whose prefix
        cache holds the request's prefix (`protos.prefix_key`)."""
        self._table = table
        self._admission = admission
        self._metrics = metrics
        self._max_migrations = max_migrations
        self._prefix_affinity = prefix_affinity

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Streams the completion from a shard, moving it to another shard when needed.

        Errors: RESOURCE_EXHAUSTED when no shard has room and the wait queue is full (with a
        retry hint); UNAVAILABLE when no shard serves or the request migrated too often;
        INTERNAL when a second shard failed while serving it; INVALID_ARGUMENT for ids or stop
        strings past their bounds; shard errors (NOT_FOUND, INVALID_ARGUMENT, ...) with the
        shard's status and message.
        """
        try:
            await self.generate(request, context)
        except RequestFailed as failure:
            pushback = (("grpc-retry-pushback-ms", _RETRY_PUSHBACK_MS),)
            metadata = pushback if failure.retry_hint else ()
            await context.abort(failure.code, failure.details, metadata)

    async def generate(self, request: generate_pb2.GenerateRequest, client: Client) -> None:
        """Places the request and streams its chunks to `client`, migrating as needed: the one
        path of every edge (gRPC Generate, the OpenAI-compatible HTTP API). Raises
        RequestFailed with the status the call ends with; metrics count the call either way."""
        progress = _Progress(arrived=time.monotonic())
        if (why := problem(request)) is not None:
            self._metrics.request_ended(
                request.adapter_id, grpc.StatusCode.INVALID_ARGUMENT.name, known=False
            )
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, why)
        # Every call gets an id of the router's own, sent to shards as `lorafleet-call-id`
        # metadata; the client's request_id is a label only (shards key requests by ids of
        # their own), so two live calls that share one never touch each other.
        call_id = uuid.uuid4().hex
        if not request.request_id:
            request.request_id = call_id
        status = grpc.StatusCode.OK
        with structlog.contextvars.bound_contextvars(
            request_id=request.request_id, call_id=call_id, adapter_id=request.adapter_id
        ):
            try:
                await self._generate(request, client, progress, ((CALL_ID_KEY, call_id),))
            except RequestFailed as failure:
                status = failure.code
                log.info("request failed", code=failure.code.name, details=failure.details)
                raise
            except asyncio.CancelledError:
                status = grpc.StatusCode.CANCELLED
                log.info("request cancelled", tokens=len(progress.token_ids))
                raise
            finally:
                self._metrics.request_ended(request.adapter_id, status.name, progress.accepted)

    async def _generate(
        self,
        request: generate_pb2.GenerateRequest,
        client: Client,
        progress: _Progress,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        while True:
            reservation = await self._place(request, progress)
            address = reservation.handle.address
            with structlog.contextvars.bound_contextvars(shard=address):
                reason = await self._run_on(reservation, request, client, progress, metadata)
                if reason is None:
                    return
                if reason == _SHARD_FAILED:
                    progress.failed_on.append(address)
                    if len(progress.failed_on) >= _MAX_SHARD_FAILURES:
                        raise RequestFailed(
                            grpc.StatusCode.INTERNAL,
                            f"shards failed {len(progress.failed_on)} times while serving this "
                            f"request ({', '.join(progress.failed_on)}); the router does not "
                            "place it again, so that one request cannot take down the fleet. "
                            f"If it repeats, report it with call id {metadata[0][1]}",
                        )
                progress.migrations += 1
                self._metrics.migrations.labels(reason).inc()
                log.info("migrating", reason=reason, tokens=len(progress.token_ids))
            if progress.migrations > self._max_migrations:
                raise RequestFailed(
                    grpc.StatusCode.UNAVAILABLE,
                    f"request moved between shards {progress.migrations} times "
                    f"(--max-migrations {self._max_migrations}); the fleet is overloaded or "
                    "failing, retry later",
                    retry_hint=True,
                )

    async def _place(
        self, request: generate_pb2.GenerateRequest, progress: _Progress
    ) -> Reservation:
        bound = context_bound(request)
        longest = bound + request.stopping.max_new_tokens if request.stopping.max_new_tokens else 0
        key = prefix_key(request) if self._prefix_affinity else None
        demand = Demand(request.adapter_id, bound + len(progress.token_ids), longest, key)
        exact = request.WhichOneof("input") == "prompt_token_ids"
        if exact and longest and longest > (pool := self._admission.largest_pool()) > 0:
            # Exact token counts that no open shard can ever hold fail now, not at a timeout.
            raise RequestFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt ({bound} tokens) + max_new_tokens ({request.stopping.max_new_tokens}) "
                f"needs {longest} tokens of KV, but the largest shard's whole KV pool holds "
                f"{pool}: "
                + (
                    f"lower max_new_tokens to at most {pool - bound}"
                    if pool > bound
                    else "shorten the prompt"
                ),
            )
        start = time.monotonic()
        try:
            reservation = await self._admission.place(demand, resumed=progress.migrations > 0)
        except QueueFull as err:
            raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), True) from None
        except QueueTimeout as err:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if err.shards else grpc.StatusCode.UNAVAILABLE
            raise RequestFailed(code, str(err), True) from None
        waited = time.monotonic() - start
        progress.queued_s += waited
        if progress.migrations == 0:
            progress.first_queue_s = waited
        self._metrics.queue_time.observe(waited)
        if key is not None:
            held = reservation.handle.holds_prefix(key)
            (self._metrics.prefix_held if held else self._metrics.prefix_not_held).inc()
        return reservation

    async def _run_on(
        self,
        reservation: Reservation,
        request: generate_pb2.GenerateRequest,
        client: Client,
        progress: _Progress,
        metadata: tuple[tuple[str, str], ...],
    ) -> str | None:
        """Proxies one leg; returns None when finished, else the reason to migrate."""
        handle = reservation.handle
        shard_request = shard_pb2.ShardGenerateRequest(
            request=request, resume=progress.resume() if progress.migrations else None
        )
        with handle.call():
            # Deadlines do not cross a proxy by themselves: hand the remainder down.
            call = handle.shard.Generate(
                shard_request, timeout=client.time_remaining(), metadata=metadata
            )
            try:
                answered = False
                async for message in call:
                    if not answered:
                        # The shard admitted the request: its next snapshot counts it.
                        reservation.answered()
                        answered = progress.accepted = True
                    if message.HasField("migration"):
                        return self._on_migration(handle, message.migration, progress)
                    if await self._forward(message.chunk, client, progress):
                        return None
                log.warning("shard stream ended without a finish reason")
            except grpc.aio.AioRpcError as err:
                if err.code() not in _MIGRATABLE:
                    raise RequestFailed(err.code(), err.details() or err.code().name) from None
                log.warning("shard call failed", code=err.code().name, details=err.details())
            finally:
                call.cancel()
                reservation.release()
        handle.mark_failed()
        return _SHARD_FAILED

    def _on_migration(
        self, handle: ShardHandle, migration: shard_pb2.Migration, progress: _Progress
    ) -> str:
        if migration.reason == shard_pb2.MIGRATION_REASON_KV_EXHAUSTED:
            handle.mark_full()
        else:
            handle.mark_draining()
        if list(migration.generated_token_ids) != progress.token_ids:
            # The client's view is the truth: resume from what it has seen.
            log.warning(
                "shard's token list differs from the forwarded tokens",
                shard_tokens=len(migration.generated_token_ids),
                forwarded=len(progress.token_ids),
            )
        return _MIGRATION_REASONS.get(migration.reason, _SHARD_FAILED)

    async def _forward(
        self,
        chunk: generate_pb2.GenerateResponse,
        client: Client,
        progress: _Progress,
    ) -> bool:
        """Writes one chunk to the client; returns True when it was the last one."""
        now = time.monotonic()
        if chunk.token_ids:
            if not progress.token_ids:
                progress.first_token_s = now - progress.arrived
                self._metrics.time_to_first_token.observe(progress.first_token_s)
            else:
                gap = (now - progress.last_write) / len(chunk.token_ids)
                self._metrics.inter_token_latency.observe(gap)
            progress.token_ids.extend(chunk.token_ids)
            progress.last_write = now
        last = chunk.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
        if last:
            usage = chunk.usage
            if progress.migrations:
                # A shard reports its queue time only with its last message, so a migrated
                # request's queue time is the router-side wait before its first dispatch.
                usage.queue_time_s = progress.first_queue_s
            else:
                usage.queue_time_s += progress.first_queue_s
            usage.generated_tokens = len(progress.token_ids)
            usage.time_to_first_token_s = progress.first_token_s
            usage.migrations = progress.migrations
        await client.write(chunk)
        if last:
            # Logged after the write: the client should not wait for a log line.
            log.info(
                "request finished",
                reason=generate_pb2.FinishReason.Name(chunk.finish_reason),
                tokens=chunk.usage.generated_tokens,
                migrations=chunk.usage.migrations,
            )
        return last

    async def ListAdapters(
        self, request: generate_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.ListAdaptersResponse:
        """Every adapter of every serving shard, one entry per (adapter, shard), `shard` set.

        Shards that do not answer within a few seconds are left out; UNAVAILABLE when none does.
        """
        try:
            return await self.adapters()
        except RequestFailed as failure:
            await context.abort(failure.code, failure.details)

    async def adapters(self) -> generate_pb2.ListAdaptersResponse:
        """ListAdapters for every edge; RequestFailed(UNAVAILABLE) when no shard answers."""
        handles = self._table.serving()
        request = generate_pb2.ListAdaptersRequest()
        replies = await asyncio.gather(
            *(h.generator.ListAdapters(request, timeout=_FANOUT_TIMEOUT_S) for h in handles),
            return_exceptions=True,
        )
        response = generate_pb2.ListAdaptersResponse()
        answered = 0
        for handle, reply in zip(handles, replies, strict=True):
            if isinstance(reply, grpc.aio.AioRpcError):
                log.warning("ListAdapters failed", shard=handle.address, code=reply.code().name)
                continue
            if isinstance(reply, BaseException):
                raise reply
            answered += 1
            for adapter in reply.adapters:
                adapter.shard = handle.address
                response.adapters.append(adapter)
        if not answered:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, self._no_shard_details())
        return response

    async def GetInfo(
        self, request: generate_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.GetInfoResponse:
        """The base model as a serving shard describes it, with the router's serving shards."""
        try:
            return await self.info()
        except RequestFailed as failure:
            await context.abort(failure.code, failure.details)

    async def info(self) -> generate_pb2.GetInfoResponse:
        """GetInfo for every edge; RequestFailed(UNAVAILABLE) when no shard answers."""
        handles = self._table.serving()
        for handle in handles:
            try:
                info = await handle.generator.GetInfo(
                    generate_pb2.GetInfoRequest(), timeout=_FANOUT_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as err:
                log.warning("GetInfo failed", shard=handle.address, code=err.code().name)
                continue
            del info.shards[:]
            info.shards.extend(h.address for h in handles)
            return info
        raise RequestFailed(grpc.StatusCode.UNAVAILABLE, self._no_shard_details())

    def _no_shard_details(self) -> str:
        known = self._table.addresses()
        return (
            f"no shard is serving ({len(known)} known: {', '.join(known) or 'none'}); "
            "check the shards' health and the router's --shard/--shard-dns"
        )
