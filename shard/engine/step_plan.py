"""One engine step as plain data: what rank 0 decides and every tensor-parallel rank replays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shard.engine.sequence import Sequence
    from shard.model.lora_weights import AdapterWeights


@dataclass(frozen=True, slots=True)
class Chunk:
    """The part of a request's uncached tokens that one step prefills: tokens
    [seq.num_cached, end). The request's next token is sampled only from the chunk that reaches
    the end of its tokens; an earlier chunk only writes its keys and values."""

    seq: Sequence
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.seq.token_ids)


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    start: int  # first row
    end: int  # one past the last row
    context_len: int  # tokens in the request's KV after this step (its earlier chunks + these)
    pages: tuple[int, ...]  # the request's pages that hold those context_len tokens, in order


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Rows of one forward: decode rows first (one per request), then prefill spans; within each
    group, rows are sorted by adapter so LoRA segments are contiguous."""

    input_ids: tuple[int, ...]  # [T]
    positions: tuple[int, ...]  # [T]
    # [num_decode] KV slot each decode row writes; a prefill row's slot follows from its chunk's
    # pages and its position, on the device (no per-token Python for a long prompt)
    slots: tuple[int, ...]
    decode_pages: tuple[tuple[int, ...], ...]  # [num_decode] page tables
    decode_context: tuple[int, ...]  # [num_decode] tokens in KV after this step
    prefills: tuple[PrefillPlan, ...]
    logits_rows: tuple[int, ...]  # [B] last row of each sampled request (decode rows, and the
    # prefill chunks that end their request's tokens), in request order
    segments: tuple[tuple[int, str], ...]  # (first row, adapter id@version; "" = base) runs
    # Adapter versions every rank must have resident before the forward (tensor-parallel replay).
    adapters: tuple[str, ...] = ()

    @property
    def num_rows(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, slots=True)
class Step:
    """One step as this rank runs it: the plan (what every rank replays) and the device weights
    of each LoRA segment's adapter version that this rank holds. The weights never leave the
    process: followers pair the plan with the versions they hold for rank 0."""

    plan: StepPlan
    weights: tuple[AdapterWeights | None, ...]  # [segments]; None: the base model


def make_step(
    decode: list[Sequence], prefill: list[Chunk], page_size: int
) -> tuple[Step, list[Sequence]]:
    """`make_plan`'s plan with the weights its requests were admitted with (the scheduler
    claimed them), and the sampled sequences in the order of its logits rows."""
    plan, sampled = make_plan(decode, prefill, page_size)
    held = {s.adapter_key: s.adapter_weights for s in (*decode, *(c.seq for c in prefill))}
    weights = tuple(held[key] if key else None for _, key in plan.segments)
    missing = [key for (_, key), w in zip(plan.segments, weights, strict=True) if key and w is None]
    if missing:
        raise RuntimeError(f"requests run on adapter versions they did not claim: {missing}")
    return Step(plan, weights), sampled


def make_plan(
    decode: list[Sequence], prefill: list[Chunk], page_size: int
) -> tuple[StepPlan, list[Sequence]]:
    """The plan for one forward, and the sampled sequences in the order of its logits rows."""
    ordered_decode = sorted(decode, key=lambda s: s.adapter_key)
    ordered_prefill = sorted(prefill, key=lambda c: c.seq.adapter_key)
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    rows: list[int] = []
    segments: list[tuple[int, str]] = []
    prefills: list[PrefillPlan] = []
    sampled: list[Sequence] = []
    spans: list[tuple[Sequence, int, Chunk | None]] = [
        (s, len(s.token_ids), None) for s in ordered_decode
    ]
    spans += [(c.seq, c.end, c) for c in ordered_prefill]
    for seq, end, chunk in spans:
        start = len(ids)
        if not segments or segments[-1][1] != seq.adapter_key:
            segments.append((start, seq.adapter_key))
        first, pages = seq.num_cached, seq.pages
        if chunk is None:
            ids.append(seq.token_ids[first])
            positions.append(first)
            slots.append(pages[first // page_size] * page_size + first % page_size)
        else:
            ids.extend(seq.token_ids[first:end])
            positions.extend(range(first, end))
        if chunk is None or chunk.last:
            rows.append(len(ids) - 1)
            sampled.append(seq)
        if chunk is not None:
            held = tuple(pages[: -(-end // page_size)])
            prefills.append(PrefillPlan(start, len(ids), end, held))
    plan = StepPlan(
        input_ids=tuple(ids),
        positions=tuple(positions),
        slots=tuple(slots),
        decode_pages=tuple(tuple(s.pages) for s in ordered_decode),
        decode_context=tuple(len(s.token_ids) for s in ordered_decode),
        prefills=tuple(prefills),
        logits_rows=tuple(rows),
        segments=tuple(segments),
        adapters=tuple(sorted({key for _, key in segments if key})),
    )
    return plan, sampled
