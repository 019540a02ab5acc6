"""gRPC edge of the shard: protobuf <-> domain objects, domain errors -> status codes.

No tensor work happens here; the engine thread does it and hands outputs back through an
asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog
from tokenizers import Tokenizer

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from shard.adapters.cache import AdapterCache
from shard.adapters.loader import AdapterError, AdapterErrorKind, resolve
from shard.adapters.tiers import AdapterEntry
from shard.edge.chat_template import ChatTemplate
from shard.edge.load_feed import LoadFeed, load_updates, pacing
from shard.edge.request_validation import (
    LARGE_INPUT,
    NoChatTemplate,
    RequestError,
    prompt_byte_bound,
    to_engine_request,
)
from shard.engine.engine import CapacityError, DrainingError, Engine, NeverFitsError
from shard.engine.faults import RequestFault, quote
from shard.engine.sequence import EngineRequest, FinishReason, MigrationReason, Resume, StepOutput
from shard.model.config import ModelConfig

log = structlog.get_logger(__name__)

_FINISH = {
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: generate_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: generate_pb2.FINISH_REASON_EOS,
}
_MIGRATION = {
    MigrationReason.KV_EXHAUSTED: shard_pb2.MIGRATION_REASON_KV_EXHAUSTED,
    MigrationReason.DRAINING: shard_pb2.MIGRATION_REASON_DRAINING,
}
_ADAPTER_CODE = {
    AdapterErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    AdapterErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterErrorKind.UNSUPPORTED: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterErrorKind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AdapterErrorKind.CHANGED: grpc.StatusCode.ABORTED,  # a retry reads the new files
}
_LOAD_TIMEOUT_S = 300.0  # LoadAdapter's wait for device room when the call has no deadline
# Metadata key of the router's id of a call (logged; the engine keys by an id of its own).
CALL_ID_KEY = "lorafleet-call-id"
_RESIDENCY = {
    "gpu": generate_pb2.ADAPTER_RESIDENCY_GPU,
    "cpu": generate_pb2.ADAPTER_RESIDENCY_CPU,
    "host": generate_pb2.ADAPTER_RESIDENCY_HOST,
    "disk": generate_pb2.ADAPTER_RESIDENCY_DISK,
}


def _chunk(out: StepOutput, tokenizer: Tokenizer) -> generate_pb2.GenerateResponse:
    msg = generate_pb2.GenerateResponse(
        token_ids=list(out.token_ids), text=out.text, logprobs=list(out.logprobs)
    )
    if out.logprobs:
        msg.token_texts.extend(
            tokenizer.decode([t], skip_special_tokens=False) for t in out.token_ids
        )
    if out.finish is not None:
        msg.finish_reason = _FINISH[out.finish]
    if out.usage is not None:
        u = out.usage
        msg.usage.CopyFrom(
            generate_pb2.Usage(
                prompt_tokens=u.prompt_tokens,
                generated_tokens=u.generated_tokens,
                queue_time_s=u.queue_time_s,
                time_to_first_token_s=u.time_to_first_token_s,
                migrations=u.migrations,
                cached_prompt_tokens=u.cached_prompt_tokens,
            )
        )
    return msg


def take_ready(
    out: StepOutput, outputs: asyncio.Queue[StepOutput]
) -> tuple[StepOutput, StepOutput | None]:
    """`out` joined with the token outputs already queued behind it, and the first queued
    output that cannot join (an error or a migration notice), if any.

    Outputs queue up only while the stream's consumer lags (gRPC flow control holds this
    generator at its yield): the backlog then goes out as one message instead of one per step,
    which saves the shard, the router and the client a message each per token they were behind.
    """
    held = None
    while not out.final and not outputs.empty():
        later = outputs.get_nowait()
        if later.error is not None or later.migration is not None:
            held = later
            break
        out = StepOutput(
            token_ids=out.token_ids + later.token_ids,
            text=out.text + later.text,
            logprobs=out.logprobs + later.logprobs,
            finish=later.finish,
            usage=later.usage,
        )
    return out, held


class ShardService:
    """Both services of a shard over one engine."""

    def __init__(
        self,
        engine: Engine,
        adapters: AdapterCache,
        tokenizer: Tokenizer,
        model: ModelConfig,
        shard_id: str,
        tp_size: int,
        max_context: int,
        load_feed: LoadFeed,
        chat: ChatTemplate | None = None,
    ) -> None:
        """`load_feed`: what the engine tells of every load change (made before the engine, which
        is given its `changed_threadsafe`); WatchLoad streams wait on it."""
        self.engine = engine
        self.chat = chat
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.model = model
        self.shard_id = shard_id
        self.tp_size = tp_size
        self.max_context = max_context
        # The longest request this shard can hold at all: prompt + max_new_tokens must fit the
        # model's context and the whole KV pool (an unset max_new_tokens runs to this limit).
        self.request_limit = min(max_context, engine.kv_tokens)
        self.max_prompt_bytes = prompt_byte_bound(tokenizer, self.request_limit)
        self.sequence = 0
        self.load_feed = load_feed

    async def stream(
        self,
        request: generate_pb2.GenerateRequest,
        resume: Resume | None,
        migratable: bool,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[StepOutput]:
        """Validates, submits, and yields the request's outputs until the final one."""
        # The engine keys requests by an id of its own: a caller's request_id is only a label,
        # and two live calls that share one never touch each other's state.
        rid = uuid.uuid4().hex
        label = request.request_id[:128] or rid
        call_id = dict(context.invocation_metadata() or ()).get(CALL_ID_KEY, "")
        structlog.contextvars.bind_contextvars(
            request_id=label, call_id=call_id[:64], adapter_id=request.adapter_id[:128]
        )
        try:
            if request.adapter_id:
                self.adapters.lookup(request.adapter_id)
            req = await self._to_engine_request(request, rid, label, resume, migratable)
        except NoChatTemplate as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except AdapterError as e:
            await context.abort(_ADAPTER_CODE[e.kind], str(e))
        except Exception as e:
            # A bug met by this request's input must not surface as UNKNOWN with a traceback.
            log.exception("request could not be prepared")
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"the shard failed to prepare this request: {type(e).__name__}: "
                f"{quote(str(e), 200)}",
            )
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        try:
            self.engine.submit(req, lambda o: loop.call_soon_threadsafe(outputs.put_nowait, o))
        except DrainingError as e:
            # Nothing ran here yet: UNAVAILABLE makes the router place it on another shard.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{e}, retry elsewhere")
        except NeverFitsError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except CapacityError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        done = False
        held: StepOutput | None = None
        try:
            while not done:
                out, held = take_ready(held or await outputs.get(), outputs)
                if out.error is not None:
                    done = True
                    err = out.error
                    if isinstance(err, AdapterError):
                        await context.abort(_ADAPTER_CODE[err.kind], str(err))
                    if isinstance(err, RequestFault):
                        code = (
                            grpc.StatusCode.INVALID_ARGUMENT
                            if err.invalid
                            else grpc.StatusCode.INTERNAL
                        )
                        await context.abort(code, str(err))
                    # Only a dead engine sends other errors, and the shard is going down:
                    # UNAVAILABLE lets the router resume the request on another shard.
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"shard failed, retry elsewhere: {err}"
                    )
                done = out.final
                yield out
        finally:
            if not done:
                self.engine.cancel(req.request_id)

    async def _to_engine_request(
        self,
        request: generate_pb2.GenerateRequest,
        rid: str,
        label: str,
        resume: Resume | None,
        migratable: bool,
    ) -> EngineRequest:
        """Validates and tokenizes; large inputs on a worker thread (a megabyte prompt takes
        seconds to tokenize and would stall every stream of the event loop)."""
        args = (
            request,
            rid,
            self.tokenizer,
            self.model,
            self.request_limit,
            resume,
            migratable,
            label,
            self.max_prompt_bytes,
            self.chat,
        )
        chat_chars = sum(len(m.content) for m in request.messages.messages)
        size = max(len(request.prompt), len(request.prompt_token_ids.ids), chat_chars)
        if resume is not None:
            size = max(size, len(resume.generated_ids))
        if size > LARGE_INPUT:
            return await asyncio.to_thread(to_engine_request, *args)
        return to_engine_request(*args)

    def snapshot(self) -> shard_pb2.LoadSnapshot:
        s = self.engine.load()
        self.sequence += 1
        return shard_pb2.LoadSnapshot(
            shard_id=self.shard_id,
            sequence=self.sequence,
            running=s.running,
            max_batch_size=s.max_batch_size,
            kv_pages_free=s.kv_pages_free,
            kv_pages_total=s.kv_pages_total,
            kv_page_size=s.kv_page_size,
            queued=s.queued,
            adapters_resident=list(s.adapters_resident),
            draining=s.draining,
            tp_size=self.tp_size,
            max_context=self.max_context,
            kv_pages_queued=s.kv_pages_queued,
            idle_s=0.0 if s.idle_since is None else time.monotonic() - s.idle_since,
        )

    def prefix_keys(self) -> frozenset[int]:
        """Prefix keys of the prefixes the prefix cache holds now."""
        return self.engine.load().prefix_keys

    def adapter_infos(self) -> list[generate_pb2.AdapterInfo]:
        return [_adapter_info(e) for e in self.adapters.entries()]


def _adapter_info(e: AdapterEntry) -> generate_pb2.AdapterInfo:
    return generate_pb2.AdapterInfo(
        adapter_id=e.adapter_id,
        residency=_RESIDENCY[e.residency],
        rank=e.rank,
        size_bytes=e.size_bytes,
        digest=e.digest,
        last_used_unix_s=e.last_used,
        target_modules=list(e.targets),
    )


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, service: ShardService) -> None:
        self.s = service

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        """Streams a completion; KV shortage preempts and recomputes here (no migration)."""
        async for out in self.s.stream(request, None, False, context):
            yield _chunk(out, self.s.tokenizer)

    async def ListAdapters(
        self, request: generate_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.ListAdaptersResponse:
        """Adapters under this shard's root with their residency."""
        return generate_pb2.ListAdaptersResponse(adapters=self.s.adapter_infos())

    async def GetInfo(
        self, request: generate_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.GetInfoResponse:
        """Base model and context size of this shard."""
        m = self.s.model
        return generate_pb2.GetInfoResponse(
            model=m.name,
            max_context=self.s.max_context,
            shards=[self.s.shard_id],
            vocab_size=m.vocab_size,
            eos_token_id=m.eos_token_ids[0] if m.eos_token_ids else 0,
        )


class ShardServicer(shard_pb2_grpc.ShardServicer):
    def __init__(self, service: ShardService) -> None:
        self.s = service

    async def Generate(
        self, request: shard_pb2.ShardGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.ShardGenerateResponse]:
        """Like Generator.Generate, resumable, ending with a migration notice when evicted."""
        resume = None
        if request.HasField("resume"):
            r = request.resume
            resume = Resume(
                tuple(r.generated_token_ids),
                r.queue_time_s,
                r.time_to_first_token_s,
                r.migrations,
            )
        async for out in self.s.stream(request.request, resume, True, context):
            if out.migration is not None:
                yield shard_pb2.ShardGenerateResponse(
                    migration=shard_pb2.Migration(
                        reason=_MIGRATION[out.migration],
                        generated_token_ids=list(out.generated_ids),
                    )
                )
            else:
                yield shard_pb2.ShardGenerateResponse(chunk=_chunk(out, self.s.tokenizer))

    async def WatchLoad(
        self, request: shard_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.WatchLoadResponse]:
        """A snapshot now, then pushed on change (coalesced) and at least once a second."""
        async for message in load_updates(
            self.s.load_feed,
            self.s.snapshot,
            request.residency_deltas,
            pacing(request),
            self.s.prefix_keys if request.prefix_keys else None,
        ):
            yield message

    async def LoadAdapter(
        self, request: shard_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.LoadAdapterResponse:
        """Reads the adapter's files again and waits until it is resident (or fails); replaced
        files become a new version for new requests, running ones finish on the old one."""
        try:
            resolve(self.s.adapters.root, request.adapter_id)
        except AdapterError as e:
            await context.abort(_ADAPTER_CODE[e.kind], str(e))
        timeout = context.time_remaining() or _LOAD_TIMEOUT_S
        try:
            err = await asyncio.to_thread(
                self.s.adapters.preload, request.adapter_id, request.pin, timeout
            )
        except TimeoutError as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        if err is not None:
            await context.abort(_ADAPTER_CODE[err.kind], str(err))
        info = _adapter_info(self.s.adapters.entry(request.adapter_id))
        return shard_pb2.LoadAdapterResponse(adapter=info)

    async def EvictAdapter(
        self, request: shard_pb2.EvictAdapterRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.EvictAdapterResponse:
        """Drops an adapter once no running request uses it."""
        return shard_pb2.EvictAdapterResponse(evicted=self.s.adapters.evict(request.adapter_id))

    async def Drain(
        self, request: shard_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.DrainResponse:
        """Stops new placements here; running requests finish, waiting ones migrate."""
        return shard_pb2.DrainResponse(running=self.s.engine.drain())
