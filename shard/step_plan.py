"""One engine step as plain data: what rank 0 decides and every tensor-parallel rank replays."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    start: int  # first row
    end: int  # one past the last row
    context_len: int  # tokens in the request's KV after this step
    pages: tuple[int, ...]  # the request's page table


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Rows of one forward: decode rows first (one per request), then prefill spans; within each
    group, rows are sorted by adapter so LoRA segments are contiguous."""

    input_ids: tuple[int, ...]  # [T]
    positions: tuple[int, ...]  # [T]
    slots: tuple[int, ...]  # [T] KV slot each row writes
    decode_pages: tuple[tuple[int, ...], ...]  # [num_decode] page tables
    decode_context: tuple[int, ...]  # [num_decode] tokens in KV after this step
    prefills: tuple[PrefillPlan, ...]
    logits_rows: tuple[int, ...]  # [B] last row of each request, in request order
    segments: tuple[tuple[int, str], ...]  # (first row, adapter id; "" = base) runs, in order
    # Adapters every rank must have resident before the forward (for tensor-parallel replay).
    adapters: tuple[str, ...] = ()

    @property
    def num_rows(self) -> int:
        return len(self.input_ids)
