"""The shard's stream edge: a lagging stream's queued token outputs go out as one message."""

from __future__ import annotations

import asyncio

from shard.edge.server import take_ready
from shard.engine.sequence import FinishReason, MigrationReason, StepOutput


def _token(i: int, **kw) -> StepOutput:
    return StepOutput(token_ids=(i,), text=f" t{i}", logprobs=(-0.5 * i,), **kw)


def _queue(*outputs: StepOutput) -> asyncio.Queue[StepOutput]:
    queue: asyncio.Queue[StepOutput] = asyncio.Queue()
    for out in outputs:
        queue.put_nowait(out)
    return queue


def test_a_backlog_of_tokens_becomes_one_output_ending_at_the_final_one():
    queue = _queue(_token(2), _token(3, finish=FinishReason.LENGTH), _token(9))
    out, held = take_ready(_token(1), queue)
    assert out.token_ids == (1, 2, 3) and out.text == " t1 t2 t3"
    assert out.logprobs == (-0.5, -1.0, -1.5)
    assert out.finish is FinishReason.LENGTH and out.final and held is None
    assert queue.qsize() == 1  # nothing past the final output is taken


def test_a_stream_that_keeps_up_is_unchanged():
    first = _token(1)
    out, held = take_ready(first, _queue())
    assert out is first and held is None


def test_a_migration_or_error_is_held_back_for_its_own_message():
    migration = StepOutput(migration=MigrationReason.KV_EXHAUSTED, generated_ids=(1, 2))
    out, held = take_ready(_token(1), _queue(_token(2), migration, _token(3)))
    assert out.token_ids == (1, 2) and not out.final and held is migration
    error = StepOutput(error=RuntimeError("engine died"))
    out, held = take_ready(_token(1), _queue(error))
    assert out.token_ids == (1,) and held is error
