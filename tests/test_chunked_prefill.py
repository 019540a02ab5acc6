"""Chunked prefill against transformers + PEFT: prompts longer than the per-step token budget are
prefilled over several steps while other requests decode, and a partly prefilled request can be
migrated, resumed, cancelled or preempted without changing anyone's greedy tokens.

The engine is driven step by step on the test's thread (its loop thread is never started), so
each test knows exactly which step a chunk runs in."""

from __future__ import annotations

import dataclasses

from shard.compose import build_engine
from shard.config import parse_config
from shard.engine.engine import Engine
from shard.engine.sequence import MigrationReason, Resume, SeqStatus, Sequence
from shard.parallel.group import SINGLE
from tests.reference import greedy
from tests.test_engine import Collector, request, until

NEW = 12
LONG = [(7 * i + 3) % 290 + 5 for i in range(21)]  # longer than every budget here
MEDIUM = [(11 * i + 1) % 290 + 5 for i in range(12)]
SHORT = [5, 17, 42, 99, 3]


def engine_of(tiny, budget: int, *extra: str) -> Engine:
    argv = ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir)]
    argv += ["--device", "cpu", "--page-size", "4", "--max-prefill-tokens", str(budget), *extra]
    engine, _, _ = build_engine(parse_config(argv, env={}), SINGLE)
    return engine


def expected(tiny, adapter: str, prompt: list[int]) -> list[int]:
    return greedy(tiny.model_dir, tiny.adapter_dir(adapter) if adapter else None, prompt, NEW)[0]


def step(engine: Engine, times: int = 1) -> None:
    for _ in range(times):
        engine._take_inbox(block=False)
        engine._step()


def run_out(engine: Engine, sinks: list[Collector]) -> None:
    until(engine, lambda: all(s.done.is_set() for s in sinks))


def seq_of(engine: Engine, rid: str) -> Sequence:
    """The engine's sequence of request `rid`, running or waiting."""
    sched = engine.scheduler
    return next(s for s in [*sched.running, *sched.waiting] if s.req.request_id == rid)


def test_long_prompts_join_running_decodes_in_chunks(tiny) -> None:
    """Prompts longer than the budget (5, odd) arrive while others decode: every running request
    gets a token in every step of the chunked prefill, and all greedy tokens equal PEFT's alone.
    (Budget 1 runs in the preemption test below.)"""
    budget = 5
    engine = engine_of(tiny, budget)
    rows = [("r8-all", SHORT), ("", [7, 8, 9]), ("r64-all-rslora", LONG), ("r4-qv", MEDIUM)]
    sinks = [Collector() for _ in rows]
    try:
        for i in (0, 1):
            engine.submit(request(f"c{i}", *rows[i], new=NEW), sinks[i])
        until(engine, lambda: all(len(s.tokens) >= 1 for s in sinks[:2]))  # both decode
        for i in (2, 3):
            engine.submit(request(f"c{i}", *rows[i], new=NEW), sinks[i])
        engine._take_inbox(block=False)
        long_seq = seq_of(engine, "c2")
        partial_steps = 0  # steps after which the long prompt was partly prefilled
        while long_seq.first_token is None:
            before = [len(s.tokens) for s in sinks[:2]]
            step(engine)
            after = [len(s.tokens) for s in sinks[:2]]
            assert all(a == b + 1 for a, b in zip(after, before, strict=True) if b < NEW)
            partial_steps += 0 < long_seq.num_cached < len(LONG)
        assert partial_steps >= len(LONG) // budget - 1
        run_out(engine, sinks)
    finally:
        engine.scheduler.adapters.close()
    assert engine.scheduler.pool.free == engine.scheduler.pool.total
    for (adapter, prompt), sink in zip(rows, sinks, strict=True):
        assert sink.tokens == expected(tiny, adapter, prompt), adapter or "base"


def test_resumed_request_reprefills_prompt_and_generated_tokens_in_chunks(tiny) -> None:
    """A shard-side Generate carrying tokens generated elsewhere re-prefills prompt + generated
    in chunks (budget 5, 21 + 4 tokens) and continues exactly where the other shard stopped."""
    want = expected(tiny, "r16-attn", LONG)
    engine = engine_of(tiny, 5)
    sink = Collector()
    req = request("m", "r16-attn", LONG, new=NEW)
    engine.submit(dataclasses.replace(req, resume=Resume(tuple(want[:4]))), sink)
    try:
        run_out(engine, [sink])
    finally:
        engine.scheduler.adapters.close()
    assert sink.tokens == want[4:]
    assert sink.outputs[-1].usage.generated_tokens == NEW
    assert engine.steps > (len(LONG) + 4) // 5  # the prefill really took several steps


def test_migration_in_the_middle_of_a_chunked_prefill(tiny) -> None:
    """A draining shard migrates a partly prefilled request (a fresh one, and one that was
    itself resumed): its pages are freed at once, it carries what it had generated, and resumed
    on another shard it continues with PEFT's tokens."""
    want = expected(tiny, "r32-mlp", LONG)
    fresh = dataclasses.replace(request("f", "r32-mlp", LONG, new=NEW), migratable=True)
    resumed = dataclasses.replace(fresh, request_id="g", resume=Resume(tuple(want[:3])))
    engines = [engine_of(tiny, 3), engine_of(tiny, 7), engine_of(tiny, 5)]
    try:
        moved = []
        for engine, req in zip(engines, (fresh, resumed), strict=False):
            sink = Collector()
            engine.submit(req, sink)
            until(engine, lambda e=engine, r=req: seq_of(e, r.request_id).num_cached > 0)
            seq = seq_of(engine, req.request_id)
            assert seq.num_cached < len(seq.token_ids) - 1  # mid-prefill
            engine.drain()
            engine.evacuate()
            step(engine)
            assert engine.scheduler.pool.free == engine.scheduler.pool.total
            out = sink.outputs[-1]
            assert out.migration is MigrationReason.DRAINING
            assert out.generated_ids == (req.resume.generated_ids if req.resume else ())
            moved.append(dataclasses.replace(req, resume=Resume(out.generated_ids, migrations=1)))
        again = [Collector(), Collector()]
        for req, sink in zip(moved, again, strict=True):
            engines[2].submit(req, sink)
        run_out(engines[2], again)
    finally:
        for engine in engines:
            engine.scheduler.adapters.close()
    assert again[0].tokens == want
    assert again[1].tokens == want[3:]


def test_cancel_in_the_middle_of_a_chunked_prefill(tiny) -> None:
    """Cancelling a partly prefilled request frees its pages at once; the decoding request
    beside it is untouched."""
    engine = engine_of(tiny, 2)
    keep, gone = Collector(), Collector()
    try:
        engine.submit(request("keep", "r8-all", SHORT, new=NEW), keep)
        until(engine, lambda: len(keep.tokens) >= 1)
        engine.submit(request("gone", "r4-qv", LONG, new=NEW), gone)
        step(engine, 3)
        assert 0 < seq_of(engine, "gone").num_cached < len(LONG)
        held = len(seq_of(engine, "gone").pages)
        free = engine.scheduler.pool.free
        engine.cancel("gone")
        step(engine)
        assert not gone.outputs
        assert all(s.req.request_id != "gone" for s in engine.scheduler.running)
        assert engine.scheduler.pool.free >= free + held - 1  # "keep" may take one page
        run_out(engine, [keep])
    finally:
        engine.scheduler.adapters.close()
    assert keep.tokens == expected(tiny, "r8-all", SHORT)
    assert engine.scheduler.pool.free == engine.scheduler.pool.total


def test_preempting_a_partly_prefilled_request_restarts_it_cleanly(tiny) -> None:
    """With 10 pages of 4 tokens, the decoding request outgrows the pool while the long prompt
    (6 pages) is still being prefilled one token per step: the long one, the newest, is
    preempted mid-prefill, its pages go back, and it later starts over and still matches."""
    engine = engine_of(tiny, 1, "--kv-pages", "10")
    old, new = Collector(), Collector()
    seen = []  # (num_cached, status) of the long request after each step
    try:
        engine.submit(request("old", "r16-attn", SHORT, new=24), old)
        until(engine, lambda: len(old.tokens) >= 1)
        engine.submit(request("new", "", LONG, new=NEW), new)
        for _ in range(2000):
            if old.done.is_set() and new.done.is_set():
                break
            step(engine)
            if not new.done.is_set():
                s = seq_of(engine, "new")
                seen.append((s.num_cached, s.status))
    finally:
        engine.scheduler.adapters.close()
    restarts = [
        i
        for i in range(1, len(seen))
        if seen[i] == (0, SeqStatus.WAITING) and 0 < seen[i - 1][0] < len(LONG)
    ]
    assert restarts, "the long request was never preempted mid-prefill"
    assert old.tokens == greedy(tiny.model_dir, tiny.adapter_dir("r16-attn"), SHORT, 24)[0]
    assert new.tokens == expected(tiny, "", LONG)
    assert engine.scheduler.pool.free == engine.scheduler.pool.total
