"""The mixed-step microbenchmark: a decode batch of B running requests, plus one prefill of N
tokens, against the same batch's decode-only step, on a real engine (scheduler, model runner,
sampling, detokenizing) driven step by step on the calling thread.

Each repetition times one decode-only step, then submits a request with an N-token prompt and
one output token and times the step that prefills it (and samples its only token, so it leaves
at once). The decode batch mixes distinct adapters with the base model. On a GPU the step's
wall time is what a client sees; on a CPU with a model of narrow layers the forward's compute is
small, so the step's time is mostly the host's Python (see bench_engine_host's `--mixed`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from shard.engine.engine import Engine
from shard.engine.sampling import SamplingParams
from shard.engine.sequence import EngineRequest, StepOutput, StopParams
from shard.engine.step_plan import Step


@dataclass(frozen=True, slots=True)
class MixedTiming:
    """Median milliseconds per step over the repetitions."""

    batch: int
    prefill_tokens: int
    decode_ms: float  # the decode-only step of `batch` requests
    mixed_ms: float  # the same batch plus one `prefill_tokens` prefill
    decode_forward_ms: float  # of which the forward call (its host share, on a GPU: + wait)
    mixed_forward_ms: float
    # CPU time of the stepping thread: on a shared machine, unlike wall time, it does not grow
    # while other processes hold the cores (on a CPU run the forward's compute is in it too)
    decode_cpu_ms: float
    mixed_cpu_ms: float


class _TimedExecutor:
    """Wraps the engine's executor to add up the seconds spent inside it."""

    def __init__(self, engine: Engine) -> None:
        self.inner = engine.executor
        self.retry_alone = self.inner.retry_alone
        self.seconds = 0.0
        engine.executor = self

    def execute(self, step: Step) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.inner.execute(step)
        finally:
            self.seconds += time.perf_counter() - start


def _request(rid: str, adapter: str, prompt: tuple[int, ...], new: int) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        adapter_id=adapter,
        prompt_ids=prompt,
        sampling=SamplingParams(),
        stopping=StopParams(max_new_tokens=new, ignore_eos=True),
    )


def _check(out: StepOutput) -> None:
    if out.error is not None:
        raise out.error


def prompt_of(n: int, vocab: int, salt: int) -> tuple[int, ...]:
    """A deterministic prompt of n token ids (no special tokens: ids from 3 up)."""
    return tuple(3 + (salt * 7919 + i * 104729) % (vocab - 3) for i in range(n))


def start_decodes(
    engine: Engine, batch: int, adapters: list[str], vocab: int, context: int, new: int
) -> None:
    """Admits `batch` requests of `context`-token prompts (adapters dealt in turn; "" is the
    base model) and steps until every one of them decodes."""
    for i in range(batch):
        req = _request(f"d{i}", adapters[i % len(adapters)], prompt_of(context, vocab, i), new)
        engine.submit(req, _check)
    engine._take_inbox(block=False)
    deadline = time.monotonic() + 600
    while len(engine.scheduler.running) < batch or any(
        s.first_token is None for s in engine.scheduler.running
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("the decode batch did not start within 600 s")
        engine._step()


def measure_mixed(
    engine: Engine,
    batch: int,
    prefill_tokens: int,
    reps: int,
    vocab: int,
    prefill_adapter: str = "",
) -> MixedTiming:
    """Times `reps` decode-only and `reps` mixed steps of the running batch (see the module
    docstring); the batch must be running (`start_decodes`) with room for 2 * reps more tokens."""
    timed = _TimedExecutor(engine)
    decode, mixed, decode_fwd, mixed_fwd, decode_cpu, mixed_cpu = [], [], [], [], [], []
    cases = ((decode, decode_fwd, decode_cpu, False), (mixed, mixed_fwd, mixed_cpu, True))
    try:
        for rep in range(reps):
            for times, fwd, cpu, prefill in cases:
                if prefill:
                    prompt = prompt_of(prefill_tokens, vocab, 10_000 + rep)
                    engine.submit(_request(f"p{rep}", prefill_adapter, prompt, 1), _check)
                    engine._take_inbox(block=False)
                timed.seconds = 0.0
                start, start_cpu = time.perf_counter(), time.thread_time()
                engine._step()
                times.append(time.perf_counter() - start)
                cpu.append(time.thread_time() - start_cpu)
                fwd.append(timed.seconds)
            if len(engine.scheduler.running) != batch:
                raise RuntimeError(
                    f"{len(engine.scheduler.running)} requests run, not the batch of {batch}: "
                    "the prefill did not finish in its step (raise --max-prefill-tokens)"
                )
    finally:
        engine.executor = timed.inner

    def ms(values: list[float]) -> float:
        return statistics.median(values) * 1e3

    return MixedTiming(
        batch,
        prefill_tokens,
        ms(decode),
        ms(mixed),
        ms(decode_fwd),
        ms(mixed_fwd),
        ms(decode_cpu),
        ms(mixed_cpu),
    )
