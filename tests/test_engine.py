"""The engine's continuous batching against transformers + PEFT, each request run alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from shard.compose import build_engine
from shard.config import parse_config
from shard.engine.engine import Engine
from shard.engine.sampling import SamplingParams
from shard.engine.sequence import EngineRequest, FinishReason, StepOutput, StopParams
from shard.parallel.group import SINGLE
from tests.reference import greedy

NEW_TOKENS = 32
PROMPTS = [
    [5, 17, 42, 99, 3],
    [7, 8, 9],
    [120, 44, 31, 200, 11, 12, 13, 14, 15],
    [300, 2, 77],
    [64, 65, 66, 67, 68, 69, 70],
    [150, 151],
    [33, 34, 35, 36],
]


class Collector:
    """Gathers one request's outputs from the engine thread."""

    def __init__(self) -> None:
        self.outputs: list[StepOutput] = []
        self.done = threading.Event()

    def __call__(self, out: StepOutput) -> None:
        self.outputs.append(out)
        if out.final:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def logprobs(self) -> list[float]:
        return [lp for o in self.outputs for lp in o.logprobs]


def make_engine(tiny, *extra: str) -> Engine:
    argv = ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir)]
    argv += ["--device", "cpu", "--page-size", "4", *extra]
    engine, _, _ = build_engine(parse_config(argv, env={}), SINGLE)
    engine.start()
    return engine


def until(engine: Engine, done: Callable[[], bool], limit: int = 3000) -> None:
    """Steps an engine whose loop thread is not running until `done()` (adapters load on their
    own thread: some steps may be empty)."""
    for _ in range(limit):
        engine._take_inbox(block=False)
        if done():
            return
        engine._step()
    raise AssertionError("the engine did not get there")


def request(rid: str, adapter: str, prompt: list[int], new: int = NEW_TOKENS) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        adapter_id=adapter,
        prompt_ids=tuple(prompt),
        sampling=SamplingParams(),
        stopping=StopParams(max_new_tokens=new, ignore_eos=True),
        return_logprobs=True,
    )


def reference(tiny, adapter: str, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    return greedy(
        tiny.model_dir, tiny.adapter_dir(adapter) if adapter else None, prompt, NEW_TOKENS
    )


def submit_all(
    engine: Engine, rows: list[tuple[str, list[int]]], prefix: str, new: int = NEW_TOKENS
) -> list[Collector]:
    """Submits one request per (adapter, prompt) row and waits until all have finished."""
    sinks = [Collector() for _ in rows]
    for i, ((adapter, prompt), sink) in enumerate(zip(rows, sinks, strict=True)):
        engine.submit(request(f"{prefix}{i}", adapter, prompt, new=new), sink)
    for sink in sinks:
        assert sink.done.wait(120)
    return sinks


def mixed_rows(tiny) -> list[tuple[str, list[int]]]:
    adapters = [*tiny.adapter_ids, "", ""]
    return [(a, PROMPTS[i % len(PROMPTS)]) for i, a in enumerate(adapters)]


def test_mixed_batch_matches_peft_alone(tiny) -> None:
    rows = mixed_rows(tiny)
    assert len({a for a, _ in rows if a}) >= 5
    engine = make_engine(tiny)
    try:
        sinks = submit_all(engine, rows, "r")
        assert engine.steps < len(rows) * NEW_TOKENS  # rows really shared forward steps
        for adapter in {a for a, _ in rows}:
            labels = {"adapter": adapter or "<base>"}
            count = engine.metrics.registry.get_sample_value(
                "lorafleet_shard_generated_tokens_total", labels
            )
            assert count == NEW_TOKENS * sum(a == adapter for a, _ in rows), labels
    finally:
        engine.stop()
    for (adapter, prompt), sink in zip(rows, sinks, strict=True):
        tokens, logits = reference(tiny, adapter, prompt)
        assert sink.tokens == tokens, f"adapter {adapter or 'base'}"
        want = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(sink.logprobs), want, atol=1e-4, rtol=1e-4)
        assert sink.outputs[-1].finish is FinishReason.LENGTH
        assert sink.outputs[-1].usage.generated_tokens == NEW_TOKENS


def test_requests_joining_mid_decode_match_alone(tiny) -> None:
    rows = mixed_rows(tiny)
    engine = make_engine(tiny)
    try:
        sinks = [Collector() for _ in rows]
        for i in (0, 1, 2):
            engine.submit(request(f"a{i}", *rows[i]), sinks[i])
        deadline = time.monotonic() + 30
        while len(sinks[0].tokens) < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert 0 < len(sinks[0].tokens) < NEW_TOKENS  # the first ones are mid-decode
        for i in range(3, len(rows)):
            engine.submit(request(f"a{i}", *rows[i]), sinks[i])
        for sink in sinks:
            assert sink.done.wait(60)
    finally:
        engine.stop()
    for (adapter, prompt), sink in zip(rows, sinks, strict=True):
        assert sink.tokens == reference(tiny, adapter, prompt)[0]


def test_kv_exhaustion_preempts_and_recomputes_exactly(tiny) -> None:
    rows = mixed_rows(tiny)[:4]
    # 4 requests need ~4 x 10 pages of 4 tokens by the end; 24 pages force evictions.
    engine = make_engine(tiny, "--kv-pages", "24")
    try:
        sinks = submit_all(engine, rows, "k")
        # The last stream may end a moment before the step that freed its pages publishes.
        deadline = time.monotonic() + 10
        while engine.load().kv_pages_free != 24 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.load().kv_pages_free == 24
    finally:
        engine.stop()
    for (adapter, prompt), sink in zip(rows, sinks, strict=True):
        assert sink.tokens == reference(tiny, adapter, prompt)[0]


@pytest.mark.parametrize("adapter", ["missing-adapter"])
def test_unknown_adapter_fails_the_request_only(tiny, adapter: str) -> None:
    engine = make_engine(tiny)
    try:
        bad, good = Collector(), Collector()
        engine.submit(request("bad", adapter, [1, 2, 3]), bad)
        engine.submit(request("good", "", [1, 2, 3], new=4), good)
        assert bad.done.wait(30) and good.done.wait(30)
        assert bad.outputs[-1].error is not None
        assert "not found" in str(bad.outputs[-1].error)
        assert len(good.tokens) == 4
    finally:
        engine.stop()


def test_a_new_requests_first_token_is_sent_before_the_running_ones_of_its_step(tiny) -> None:
    engine = make_engine(tiny)
    sent: list[tuple[int, str]] = []  # (step, request id) of every output, in sink order

    class Recorder(Collector):
        def __init__(self, rid: str) -> None:
            super().__init__()
            self.rid = rid

        def __call__(self, out: StepOutput) -> None:
            sent.append((engine.steps, self.rid))  # sinks run on the engine thread, mid-step
            super().__call__(out)

    try:
        running = [Recorder(f"run{i}") for i in range(3)]
        for i, sink in enumerate(running):
            engine.submit(request(sink.rid, "", PROMPTS[i], new=60), sink)
        deadline = time.monotonic() + 60
        while min(len(s.outputs) for s in running) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)  # all three are decoding
        newcomer = Recorder("new")
        engine.submit(request("new", "", PROMPTS[4], new=4), newcomer)
        assert newcomer.done.wait(60) and all(s.done.wait(60) for s in running)
    finally:
        engine.stop()
    step = next(step for step, rid in sent if rid == "new")
    same_step = [rid for s, rid in sent if s == step]
    # The newcomer was prefilled in a step that also decoded the running requests, and its
    # first token went out before theirs.
    assert len(same_step) > 1 and same_step[0] == "new", same_step
