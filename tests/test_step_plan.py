"""make_plan against a row-by-row reference: decode and prefill mixes, adapter runs, page tables."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, models

from shard.detokenizer import TextStream
from shard.sampling import SamplingParams
from shard.sequence import EngineRequest, Sequence, StopParams
from shard.step_plan import make_plan

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


@pytest.mark.parametrize("seed", range(20))
def test_plan_matches_row_by_row_reference(seed: int) -> None:
    rng = random.Random(seed)
    keys = ["", "a@1", "b@1", "b@2"][: rng.randint(1, 4)]
    decode = [sequence(rng, rng.choice(keys), True) for _ in range(rng.randint(0, 9))]
    prefill = [sequence(rng, rng.choice(keys), False) for _ in range(rng.randint(0, 4))]
    if not decode and not prefill:
        decode = [sequence(rng, keys[0], True)]
    plan, order = make_plan(decode, prefill, PAGE_SIZE)

    by_key = sorted(decode, key=lambda s: s.adapter_key)
    assert order == by_key + sorted(prefill, key=lambda s: s.adapter_key)
    rows = [(s, p) for s in order for p in range(s.num_cached, len(s.token_ids))]
    assert plan.input_ids == tuple(s.token_ids[p] for s, p in rows)
    assert plan.positions == tuple(p for _, p in rows)
    assert plan.slots == tuple(s.pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for s, p in rows)
    spans = []  # (sequence, first row, one past its last row)
    for s in order:
        start = spans[-1][2] if spans else 0
        spans.append((s, start, start + len(s.token_ids) - s.num_cached))
    assert plan.logits_rows == tuple(end - 1 for _, _, end in spans)
    assert plan.decode_pages == tuple(tuple(s.pages) for s in by_key)
    assert plan.decode_context == tuple(len(s.token_ids) for s in by_key)
    assert [(p.start, p.end, p.context_len, p.pages) for p in plan.prefills] == [
        (start, end, len(s.token_ids), tuple(s.pages)) for s, start, end in spans[len(decode) :]
    ]
    runs = [(start, s.adapter_key) for s, start, _ in spans]
    assert plan.segments == tuple(r for k, r in enumerate(runs) if k == 0 or runs[k - 1][1] != r[1])
    assert plan.adapters == tuple(sorted({s.adapter_key for s in order} - {""}))
