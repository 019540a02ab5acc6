"""The step loop, in its own thread: schedule -> one forward -> sample -> stream tokens out."""

from __future__ import annotations

import dataclasses
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch
from tokenizers import Tokenizer

from shard.engine.detokenizer import TextStream
from shard.engine.executor import Executor
from shard.engine.faults import RequestFault, is_process_fault, request_fault
from shard.engine.inbox import Cancel, Drain, Evacuate, Fail, Inbox, Message, Submit, Wake
from shard.engine.isolated_step import run_forward, sample_tokens
from shard.engine.kv_cache import pages_for
from shard.engine.scheduler import Scheduler
from shard.engine.sequence import (
    EngineRequest,
    FinishReason,
    MigrationReason,
    Sequence,
    Sink,
    StepOutput,
)
from shard.metrics import ShardMetrics, adapter_label

log = structlog.get_logger(__name__)


class CapacityError(Exception):
    """The shard cannot take the request now (its queue is full)."""


class NeverFitsError(Exception):
    """The request can never fit this shard's whole KV pool, however long it waits."""


class DrainingError(CapacityError):
    """The shard drains: any other shard can take the request."""


@dataclass(frozen=True, slots=True)
class LoadState:
    """The engine's load, as the shard's WatchLoad reports it."""

    version: int
    running: int
    queued: int
    max_batch_size: int
    kv_pages_free: int
    kv_pages_total: int
    kv_page_size: int
    kv_pages_queued: int
    adapters_resident: tuple[str, ...]
    draining: bool
    # time.monotonic() since when nothing has run or waited here; None while something does.
    idle_since: float | None = None
    # Prefix keys of the prefixes the prefix cache holds (`shard.engine.prefix_keys`).
    prefix_keys: frozenset[int] = frozenset()


class Engine:
    """Owns the scheduler and the model runner; the server talks to it only through `submit`,
    `cancel`, `drain` and `load`."""

    def __init__(
        self,
        scheduler: Scheduler,
        executor: Executor,
        tokenizer: Tokenizer,
        eos_ids: tuple[int, ...],
        max_context: int,
        max_queue: int,
        metrics: ShardMetrics,
        inbox: Inbox | None = None,
        on_load: Callable[[], None] | None = None,
    ) -> None:
        """`metrics`: the shard's counters, the ones its adapter and prefix caches count in;
        `inbox`: where other threads reach the step loop, made first when a part built before
        the engine reports faults to it (a fresh one otherwise); `on_load`: called (from the
        engine thread or the caller's) after every load change (the WatchLoad streams' feed)."""
        self.scheduler = scheduler
        self.executor = executor
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_context = max_context
        self.max_queue = max_queue
        self._inbox = inbox if inbox is not None else Inbox()
        self._seqs: dict[str, Sequence] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._draining = False
        self._idle_since: float | None = time.monotonic()
        self._on_load = on_load
        self._load = self._snapshot(0)
        self.metrics = metrics
        self.metrics.idle_seconds.set_function(self.idle_seconds)
        self.steps = 0

    # -- thread-safe API ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(Wake())
        self._thread.join(timeout)

    def submit(self, req: EngineRequest, sink: Sink) -> None:
        """Queues a request; its outputs go to `sink` from the engine thread."""
        self._check_fits(req)
        if self._load.queued >= self.max_queue:
            raise CapacityError(f"the shard's queue is full ({self.max_queue} requests waiting)")
        if self._draining:
            raise DrainingError("the shard is draining and takes no new requests")
        self._inbox.put(Submit(req, sink))

    @property
    def kv_tokens(self) -> int:
        """Tokens the whole KV pool holds: no request may outgrow it (the shard's edge refuses
        longer ones with the same bound, `_check_fits` guards callers that bypass the edge)."""
        return self.scheduler.pool.total * self.scheduler.page_size

    def _check_fits(self, req: EngineRequest) -> None:
        """Raises NeverFitsError when the request at its longest outgrows the whole KV pool:
        admitted, it would be preempted and put back forever, blocking the queue behind it."""
        page_size = self.scheduler.page_size
        total = self.scheduler.pool.total
        tokens = len(req.prompt_ids) + req.stopping.max_new_tokens
        if tokens > self.kv_tokens:
            room = self.kv_tokens - len(req.prompt_ids)
            fix = (
                f"lower max_new_tokens to at most {room}"
                if room > 0
                else "shorten the prompt or use a shard with more KV memory"
            )
            raise NeverFitsError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens "
                f"({req.stopping.max_new_tokens}) needs {pages_for(tokens, page_size)} KV pages "
                f"of {page_size} tokens, but this shard's whole KV pool has {total} pages "
                f"({self.kv_tokens} tokens): {fix}"
            )

    def cancel(self, request_id: str) -> None:
        self._inbox.put(Cancel(request_id))

    def drain(self) -> int:
        """Stops admissions; waiting migratable requests leave at once. Returns running count."""
        self._draining = True
        self._inbox.put(Drain())
        return self._load.running

    def evacuate(self) -> None:
        """Migrates every running migratable request (the end of a drain)."""
        self._inbox.put(Evacuate())

    @property
    def failure(self) -> BaseException | None:
        """The process-wide fault that ended the engine (or will: see `Inbox.fail`)."""
        return self._inbox.failure

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def load(self) -> LoadState:
        return self._load

    def idle_seconds(self) -> float:
        """Seconds since the shard last had a request running or waiting; 0 while it has one."""
        since = self._load.idle_since
        return 0.0 if since is None else time.monotonic() - since

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_inbox(block=not self._seqs)
                self._step()
        except BaseException as exc:
            self._inbox.failure = self._inbox.failure or exc
            log.exception("engine failed")
            for seq in list(self._seqs.values()):
                seq.sink(StepOutput(error=exc))
            self._seqs.clear()

    def _take_inbox(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(msg)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._publish()  # once per batch of commands: a burst of submits is one snapshot

    def _handle(self, msg: Message) -> None:
        match msg:
            case Submit(req, sink):
                self._admit_request(req, sink)
            case Cancel(request_id):
                seq = self._seqs.pop(request_id, None)
                if seq is not None:
                    self.scheduler.release(seq)
                    log.info(
                        "request cancelled", request_id=seq.req.label, engine_id=seq.request_id
                    )
            case Fail(error):
                raise error
            case Drain() | Evacuate():
                group = self.scheduler.waiting if isinstance(msg, Drain) else self._seqs.values()
                for seq in list(group):
                    if seq.req.migratable:
                        self._migrate(seq, MigrationReason.DRAINING)
            case Wake():
                pass

    def _admit_request(self, req: EngineRequest, sink: Sink) -> None:
        if req.sampling.seed is None:
            req = dataclasses.replace(
                req, sampling=dataclasses.replace(req.sampling, seed=random.getrandbits(63))
            )
        resumed = req.resume.generated_ids if req.resume else ()
        if req.request_id in self._seqs:
            _deliver(sink, StepOutput(error=RequestFault(f"engine id {req.request_id} is in use")))
            return
        try:
            text = TextStream(
                self.tokenizer, req.prompt_ids, stop=req.stopping.stop, generated_ids=resumed
            )
        except Exception as exc:  # one request's fault: the loop goes on
            if is_process_fault(exc):
                raise
            self._report_fault(req, exc)
            _deliver(sink, StepOutput(error=request_fault(exc, req.label)))
            return
        seq = Sequence(req, sink, text)
        self._seqs[req.request_id] = seq
        self.scheduler.add(seq)

    def _step(self) -> None:
        sched = self.scheduler.schedule()
        for seq, err in sched.failed:
            self._seqs.pop(seq.request_id, None)
            self.metrics.requests.labels(adapter_label(seq.adapter_id), "error").inc()
            seq.sink(StepOutput(error=err))
        for seq in sched.evicted:
            if seq.req.migratable:
                self._migrate(seq, MigrationReason.KV_EXHAUSTED)
            else:
                self.scheduler.add(seq, front=True)
                log.info("request preempted", request_id=seq.req.label)
        if sched.empty:
            self._publish()
            if self.scheduler.waiting:
                time.sleep(0.002)  # adapters are loading or pages are short: look again soon
            return
        started = time.perf_counter()
        logits, order, prefills = run_forward(
            self.executor, sched.decode, sched.prefill, self.scheduler.page_size, self._fail
        )
        if order:
            self._emit(logits, order, prefills)
        self.steps += 1
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(sched.decode) + len(sched.prefill))
        self._publish()

    def _emit(self, logits: torch.Tensor, order: list[Sequence], prefills: set[Sequence]) -> None:
        """Samples the next token of each sequence in `order` (logits row i is order[i]) and
        streams it out; `prefills` are those whose prompt ended in this step."""
        rows = sample_tokens(logits, order, self._fail)
        self.metrics.tokens_generated(seq.adapter_id for seq, _, _ in rows)
        now = time.monotonic()  # when this step's tokens came out, for every sequence
        # First tokens (the prefill rows, last in `order`) go out ahead of the running streams':
        # each message then costs tens of microseconds in this process's and the router's event
        # loops, so at batch 32 a first token sent last would wait ~1-2 ms behind the others.
        first = len(rows) - sum(seq in prefills for seq, _, _ in rows)
        for seq, tok, lp in rows[first:] + rows[:first]:
            try:
                self._advance(seq, tok, lp, now)
            except Exception as exc:  # one request's fault: the loop goes on
                if is_process_fault(exc):
                    raise
                self._fail(seq, exc)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        """Ends one request with its own fault; everything it held is freed."""
        self._seqs.pop(seq.request_id, None)
        self.scheduler.release(seq)
        self._report_fault(seq.req, exc)
        _deliver(seq.sink, StepOutput(error=request_fault(exc, seq.req.label)))

    def _report_fault(self, req: EngineRequest, exc: Exception) -> None:
        log.warning(
            "request failed in the engine; the others go on",
            request_id=req.label,
            engine_id=req.request_id,
            error=f"{type(exc).__name__}: {exc}",
            invalid=isinstance(exc, RequestFault) and exc.invalid,
        )
        self.metrics.requests.labels(adapter_label(req.adapter_id), "error").inc()

    def _advance(self, seq: Sequence, token: int, logprob: float, now: float) -> None:
        if seq.first_token is None:
            seq.first_token = now
            if seq.adapter_id and seq.first_scheduled is not None:
                queued = seq.first_scheduled - seq.req.arrival
                self.metrics.adapter_queue_seconds.labels(seq.adapter_id).observe(queued)
        seq.token_ids.append(token)
        seq.generated.append(token)
        stop = seq.req.stopping
        finish = None
        text = ""
        if token in self.eos_ids and not stop.ignore_eos:
            finish = FinishReason.EOS
        else:
            delta = seq.text.push([token])
            text = delta.text
            if delta.stopped:
                finish = FinishReason.STOP
        if finish is None and (
            len(seq.generated) >= stop.max_new_tokens or len(seq.token_ids) >= self.max_context
        ):
            finish = FinishReason.LENGTH
        if finish in (FinishReason.EOS, FinishReason.LENGTH):
            text += seq.text.finish()
        out = StepOutput(
            token_ids=(token,),
            text=text,
            logprobs=(logprob,) if seq.req.return_logprobs else (),
            finish=finish,
            usage=seq.usage() if finish else None,
        )
        if finish is not None:
            self.metrics.requests.labels(adapter_label(seq.adapter_id), finish.value).inc()
            self._seqs.pop(seq.request_id, None)
            self.scheduler.release(seq)
        seq.sink(out)

    def _migrate(self, seq: Sequence, reason: MigrationReason) -> None:
        self.scheduler.release(seq)
        self._seqs.pop(seq.request_id, None)
        log.info("request migrates", request_id=seq.req.label, reason=reason.value)
        self.metrics.requests.labels(adapter_label(seq.adapter_id), "migrated").inc()
        seq.sink(StepOutput(migration=reason, generated_ids=tuple(seq.generated)))

    def _snapshot(self, version: int) -> LoadState:
        sched = self.scheduler
        return LoadState(
            version=version,
            running=len(sched.running),
            queued=len(sched.waiting),
            max_batch_size=sched.max_batch_size,
            kv_pages_free=sched.pool.free,
            kv_pages_total=sched.pool.total,
            kv_page_size=sched.page_size,
            kv_pages_queued=sched.pages_waiting(),
            adapters_resident=tuple(sched.adapters.resident_ids()),
            draining=self._draining,
            idle_since=self._idle_since,
            prefix_keys=sched.prefix.keys.current if sched.prefix is not None else frozenset(),
        )

    def _publish(self) -> None:
        sched = self.scheduler
        if sched.running or sched.waiting:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = time.monotonic()
        snap = self._snapshot(self._load.version)
        if snap != self._load:
            self._load = dataclasses.replace(snap, version=self._load.version + 1)
            m = self.metrics
            m.running.set(snap.running)
            m.queued.set(snap.queued)
            m.kv_free.set(snap.kv_pages_free)
            m.kv_total.set(snap.kv_pages_total)
            m.adapters.set(len(snap.adapters_resident))
            if self._on_load is not None:
                self._on_load()


def _deliver(sink: Sink, out: StepOutput) -> None:
    """Hands a request its last output; a sink that cannot take it (its event loop has closed)
    must not end the engine on a failure path."""
    try:
        sink(out)
    except Exception:
        log.warning("could not deliver a request's error", exc_info=True)
