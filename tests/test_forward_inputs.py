"""The one builder of forward inputs in both modes: eager steps (exact rows, tables as wide as the
longest) and padded decode steps (a graph's fixed shape, padding on the scratch page), checked
field by field against plans made from random running requests."""

from __future__ import annotations

import random

import pytest
import torch

from shard.engine.forward_inputs import NO_ROWS, DecodePadding, ForwardInputs
from shard.engine.step_plan import make_plan
from shard.model.lora_weights import AdapterWeights
from shard.model.projections import LORA_MODULES
from tests.test_step_plan import PAGE_SIZE, chunk, sequence

SCRATCH = 7  # the KV cache's scratch page in these tests
GROUP = 2  # query heads per KV head


def adapter(name: str, rank: int) -> AdapterWeights:
    a = {m: torch.zeros(2, rank, 8) for m in LORA_MODULES}
    b = {m: torch.zeros(2, rank, 8) for m in LORA_MODULES}
    return AdapterWeights(name, "digest", "v1", rank, 2.0, a, b)


@pytest.mark.parametrize("seed", range(10))
def test_eager_fields_and_meta_follow_the_plan_row_by_row(seed: int) -> None:
    rng = random.Random(seed)
    decode = [sequence(rng, rng.choice(("", "a@1")), True) for _ in range(rng.randint(0, 5))]
    prefill = [chunk(rng, sequence(rng, "", False)) for _ in range(rng.randint(1, 3))]
    plan, _ = make_plan(decode, prefill, PAGE_SIZE)
    builder = ForwardInputs(PAGE_SIZE, GROUP)
    fields = builder.fields(plan)
    nd = len(plan.decode_pages)
    width = max((len(p) for p in plan.decode_pages), default=1)
    assert fields["input_ids"].tolist() == list(plan.input_ids)
    assert fields["positions"].tolist() == list(plan.positions)
    assert fields["decode_slots"].tolist() == list(plan.slots)
    assert fields["context_lens"].tolist() == list(plan.decode_context)
    assert fields["logits_rows"].tolist() == list(plan.logits_rows)
    assert fields["block_tables"].dtype == torch.int32
    assert fields["block_tables"].tolist() == [
        [*p, *([0] * (width - len(p)))] for p in plan.decode_pages
    ]
    meta = builder.meta(fields, plan.prefills, None)
    assert meta.num_decode == nd
    # Every row's KV slot: its page of the request's pages, its offset in that page.
    slots = list(plan.slots)
    for p in plan.prefills:
        for row in range(p.start, p.end):
            pos = plan.positions[row]
            slots.append(p.pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE)
    assert meta.slot_mapping.tolist() == slots
    assert meta.prefill_pages is not None
    assert meta.prefill_pages.tolist() == [page for p in plan.prefills for page in p.pages]
    only = plan.prefills[0]
    whole = len(plan.prefills) == 1 and only.end - only.start == only.context_len
    assert meta.prefill_causal == whole
    if whole:
        assert meta.prefill_mask is None
        return
    # Row i of a chunk sees its request's slots up to its own position in the gathered pages.
    assert meta.prefill_mask is not None
    rows = [(p, r) for p in plan.prefills for r in range(p.start, p.end)]
    first = 0
    expect = []
    offsets = {}
    for p in plan.prefills:
        offsets[p] = first
        first += len(p.pages) * PAGE_SIZE
    for p, r in rows:
        base = offsets[p]
        expect.append([base <= j <= base + plan.positions[r] for j in range(first)])
    assert meta.prefill_mask.tolist() == expect * GROUP


@pytest.mark.parametrize("seed", range(10))
def test_padded_fields_put_padding_rows_and_columns_on_the_scratch_page(seed: int) -> None:
    rng = random.Random(seed)
    decode = [sequence(rng, rng.choice(("", "a@1")), True) for _ in range(rng.randint(1, 6))]
    plan, _ = make_plan(decode, [], PAGE_SIZE)
    padding = DecodePadding(rows=8, width=16, rank=0, scratch_page=SCRATCH)
    fields = ForwardInputs(PAGE_SIZE).fields(plan, padding)
    b, pad = plan.num_rows, 8 - plan.num_rows
    scratch_slot = SCRATCH * PAGE_SIZE
    assert fields["input_ids"].tolist() == [*plan.input_ids, *([0] * pad)]
    assert fields["positions"].tolist() == [*plan.positions, *([0] * pad)]
    assert fields["decode_slots"].tolist() == [*plan.slots, *([scratch_slot] * pad)]
    assert fields["context_lens"].tolist() == [*plan.decode_context, *([1] * pad)]
    assert fields["logits_rows"].tolist() == list(range(8))
    tables = fields["block_tables"].tolist()
    assert len(tables) == 8
    for row, pages in zip(tables[:b], plan.decode_pages, strict=True):
        assert row == [*pages, *([SCRATCH] * (16 - len(pages)))]
    assert tables[b:] == [[SCRATCH] * 16] * pad
    meta = ForwardInputs(PAGE_SIZE).meta(fields, (), None)
    assert meta.num_decode == 8 and meta.prefill_pages is None and meta.prefill_mask is None


def test_a_padded_step_with_no_rows_is_all_padding() -> None:
    padding = DecodePadding(rows=4, width=8, rank=16, scratch_page=SCRATCH)
    builder = ForwardInputs(PAGE_SIZE)
    fields = builder.fields(NO_ROWS, padding)
    assert fields["input_ids"].tolist() == [0] * 4
    assert fields["decode_slots"].tolist() == [SCRATCH * PAGE_SIZE] * 4
    assert fields["block_tables"].tolist() == [[SCRATCH] * 8] * 4
    assert fields["context_lens"].tolist() == [1] * 4
    lora = builder.lora(NO_ROWS, [], torch.float32, padding)
    assert lora is not None
    assert lora.seg_starts.tolist() == [0, 4, 4, 4, 4, 4]  # one base segment of every row
    assert all(g.ranks.count_nonzero() == 0 for g in lora.groups.values())


def test_a_padded_step_refuses_prefills_and_too_many_rows() -> None:
    rng = random.Random(0)
    builder = ForwardInputs(PAGE_SIZE)
    mixed, _ = make_plan([], [chunk(rng, sequence(rng, "", False))], PAGE_SIZE)
    with pytest.raises(ValueError, match="decode rows only"):
        builder.fields(mixed, DecodePadding(8, 8, 0, SCRATCH))
    wide, _ = make_plan([sequence(rng, "", True) for _ in range(3)], [], PAGE_SIZE)
    with pytest.raises(ValueError, match="up to 2 decode rows"):
        builder.fields(wide, DecodePadding(2, 8, 0, SCRATCH))


def test_lora_tables_in_both_modes() -> None:
    rng = random.Random(1)
    decode = [sequence(rng, key, True) for key in ("", "a@1", "a@1", "b@1")]
    plan, _ = make_plan(decode, [], PAGE_SIZE)
    weights = [
        None if not key else adapter(key, 8 if key == "a@1" else 16) for _, key in plan.segments
    ]
    builder = ForwardInputs(PAGE_SIZE)
    eager = builder.lora(plan, weights, torch.float32)
    assert eager is not None
    assert eager.seg_starts.tolist() == [row for row, _ in plan.segments] + [plan.num_rows]
    assert builder.lora(plan, [None] * len(weights), torch.float32) is None
    padding = DecodePadding(rows=8, width=8, rank=16, scratch_page=SCRATCH)
    padded = builder.lora(plan, weights, torch.float32, padding)
    assert padded is not None
    starts = [row for row, _ in plan.segments]
    # The plan's segments, the padding rows' base segment, then empty segments up to one a row.
    assert padded.seg_starts.tolist() == [*starts, 4, *([8] * (9 - len(starts)))]
    for group in padded.groups.values():
        ranks = group.ranks.view(-1, 9)[0].tolist()
        assert ranks == [0 if w is None else w.rank for w in weights] + [0] * (9 - len(weights))
    assert builder.lora(plan, weights, torch.float32, DecodePadding(8, 8, 0, SCRATCH)) is None
