"""make_plan against a row-by-row reference: decode rows and prefill chunks (whole prompts, first
and middle chunks, recomputed prefixes), adapter runs, page tables, sampled rows."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, models

from shard.engine.detokenizer import TextStream
from shard.engine.sampling import SamplingParams
from shard.engine.sequence import EngineRequest, Sequence, StopParams
from shard.engine.step_plan import Chunk, make_plan

PAGE_SIZE = 4
TOKENIZER = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))


def sequence(rng: random.Random, adapter_key: str, decode: bool) -> Sequence:
    """A running request: a decode row (all but its last token cached) or a prefill span."""
    prompt = tuple(rng.randrange(64) for _ in range(rng.randint(1, 13)))
    req = EngineRequest(f"r{rng.random()}", "", prompt, SamplingParams(), StopParams(8))
    seq = Sequence(req, lambda out: None, TextStream(TOKENIZER, prompt))
    seq.adapter_key = adapter_key
    if decode:
        seq.token_ids.append(rng.randrange(64))
        seq.num_cached = len(seq.token_ids) - 1
    else:
        seq.num_cached = rng.choice((0, 0, len(prompt) // 2))  # a recomputed prefix or not
    seq.pages = rng.sample(range(100), -(-len(seq.token_ids) // PAGE_SIZE))
    return seq


def chunk(rng: random.Random, seq: Sequence) -> Chunk:
    """The whole rest of the prompt, or a chunk of it ending anywhere after its cached part."""
    end = len(seq.token_ids)
    if rng.random() < 0.5:
        end = rng.randint(seq.num_cached + 1, end)
    return Chunk(seq, end)


@pytest.mark.parametrize("seed", range(20))
def test_plan_matches_row_by_row_reference(seed: int) -> None:
    rng = random.Random(seed)
    keys = ["", "a@1", "b@1", "b@2"][: rng.randint(1, 4)]
    decode = [sequence(rng, rng.choice(keys), True) for _ in range(rng.randint(0, 9))]
    prefill = [chunk(rng, sequence(rng, rng.choice(keys), False)) for _ in range(rng.randint(0, 4))]
    if not decode and not prefill:
        decode = [sequence(rng, keys[0], True)]
    plan, sampled = make_plan(decode, prefill, PAGE_SIZE)

    by_key = sorted(decode, key=lambda s: s.adapter_key)
    chunks = sorted(prefill, key=lambda c: c.seq.adapter_key)
    spans = [(s, len(s.token_ids), True) for s in by_key]  # (sequence, end, sampled)
    spans += [(c.seq, c.end, c.end == len(c.seq.token_ids)) for c in chunks]
    assert sampled == [s for s, _, last in spans if last]
    rows = [(s, p) for s, end, _ in spans for p in range(s.num_cached, end)]
    assert plan.input_ids == tuple(s.token_ids[p] for s, p in rows)
    assert plan.positions == tuple(p for _, p in rows)
    decoded = [(s, len(s.token_ids) - 1) for s in by_key]
    assert plan.slots == tuple(
        s.pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for s, p in decoded
    )
    bounds = []  # (sequence, first row, one past its last row, context after, sampled)
    for s, end, last in spans:
        start = bounds[-1][2] if bounds else 0
        bounds.append((s, start, start + end - s.num_cached, end, last))
    assert plan.logits_rows == tuple(stop - 1 for _, _, stop, _, last in bounds if last)
    assert plan.decode_pages == tuple(tuple(s.pages) for s in by_key)
    assert plan.decode_context == tuple(len(s.token_ids) for s in by_key)
    assert [(p.start, p.end, p.context_len, p.pages) for p in plan.prefills] == [
        (start, stop, end, tuple(s.pages[: -(-end // PAGE_SIZE)]))
        for s, start, stop, end, _ in bounds[len(decode) :]
    ]
    runs = [(start, s.adapter_key) for s, start, *_ in bounds]
    assert plan.segments == tuple(r for k, r in enumerate(runs) if k == 0 or runs[k - 1][1] != r[1])
    assert plan.adapters == tuple(sorted({s.adapter_key for s, *_ in spans} - {""}))
