"""The one builder of a step's forward inputs: token ids, ForwardMeta and LoRA tables of a plan.

Two modes. An eager step has exactly the plan's rows, and page tables as wide as its longest.
A padded decode step (what a CUDA graph replays) has a fixed shape, `DecodePadding`: rows past
the plan's read token 0 at position 0, write their key and value into the KV cache's scratch
page (never handed to a request), attend to that one slot, and belong to a base-model segment
whose logits are dropped; page-table columns past a request's pages hold the scratch page.

Host tensors come out of `fields` by name; the caller puts them on the device (one copy) and
builds the ForwardMeta over the device tensors with `meta`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.engine.step_plan import PrefillPlan, StepPlan
from shard.model.forward_meta import ForwardMeta
from shard.model.layers.lora import LoraBatch, build_lora_batch
from shard.model.lora_weights import AdapterWeights

HOST = torch.device("cpu")


@dataclass(frozen=True, slots=True)
class DecodePadding:
    """The fixed shape a decode-only step is padded to."""

    rows: int  # decode rows, the plan's and then padding
    width: int  # page-table width
    rank: int  # LoRA rank class of the tables; 0: no adapter, no tables
    scratch_page: int  # the KV cache's page for padding rows


# A step with no rows: padded, every row is padding (what a graph runs before any step).
NO_ROWS = StepPlan((), (), (), (), (), (), (), ())


@dataclass(frozen=True, slots=True)
class ForwardInputs:
    """Builds forward inputs over one rank's KV cache."""

    page_size: int
    query_group: int = 1  # query heads per KV head: the prefill mask's row groups

    def fields(
        self, plan: StepPlan, padding: DecodePadding | None = None
    ) -> dict[str, torch.Tensor]:
        """Host tensors by name: `input_ids` [T], `positions` [T], `decode_slots` [num_decode]
        (the KV slot of each decode row), `block_tables` [num_decode, width] int32,
        `context_lens` [num_decode] int32, `logits_rows` [B] and, when the plan prefills,
        `prefill_first` [N_p] (each prefill row's first key slot in the gathered pages of every
        chunk) and `prefill_pages` [P]. Padded, T = num_decode = B = padding.rows."""
        pad = padding.rows - plan.num_rows if padding is not None else 0
        if padding is not None:
            if plan.prefills or pad < 0:
                raise ValueError(f"a padded step holds up to {padding.rows} decode rows only")
            width, filler = padding.width, padding.scratch_page
        else:
            width, filler = max((len(p) for p in plan.decode_pages), default=1), 0
        scratch_slot = filler * self.page_size
        tables = [[*p, *([filler] * (width - len(p)))] for p in plan.decode_pages]
        tables += [[filler] * width] * pad
        out = {
            "input_ids": torch.tensor([*plan.input_ids, *([0] * pad)], dtype=torch.int64),
            "positions": torch.tensor([*plan.positions, *([0] * pad)], dtype=torch.int64),
            "decode_slots": torch.tensor([*plan.slots, *([scratch_slot] * pad)], dtype=torch.int64),
            "block_tables": torch.tensor(tables, dtype=torch.int32).view(len(tables), width),
            "context_lens": torch.tensor([*plan.decode_context, *([1] * pad)], dtype=torch.int32),
            "logits_rows": torch.tensor(
                [*plan.logits_rows, *range(plan.num_rows, plan.num_rows + pad)], dtype=torch.int64
            ),
        }
        if plan.prefills:
            first: list[int] = []
            pages: list[int] = []
            for p in plan.prefills:
                first += [len(pages) * self.page_size] * (p.end - p.start)
                pages += p.pages
            out["prefill_first"] = torch.tensor(first, dtype=torch.int64)
            out["prefill_pages"] = torch.tensor(pages, dtype=torch.int64)
        return out

    def lora(
        self,
        plan: StepPlan,
        weights: list[AdapterWeights | None],
        dtype: torch.dtype,
        padding: DecodePadding | None = None,
        device: torch.device = HOST,
    ) -> LoraBatch | None:
        """Segments and per-projection weight pointers of the plan's rows (`weights[i]` is
        segment i's adapter); None when no table is needed. Padded: the tables of the padding's
        rank class, with one more segment (the padding rows', base model) and room for one
        segment per row."""
        starts = [row for row, _ in plan.segments]
        if padding is None:
            if all(w is None for w in weights):
                return None
            return build_lora_batch(starts, weights, plan.num_rows, dtype, device)
        if not padding.rank:
            return None
        return build_lora_batch(
            [*starts, plan.num_rows],
            [*weights, None],
            padding.rows,
            dtype,
            device,
            num_segments=padding.rows + 1,
            rank=padding.rank,
        )

    def meta(
        self,
        dev: dict[str, torch.Tensor],
        prefills: tuple[PrefillPlan, ...],
        lora: LoraBatch | None,
    ) -> ForwardMeta:
        """The ForwardMeta over `fields`' tensors on the device, for a plan with these prefill
        chunks; the prefill rows' KV slots and mask are computed there."""
        num_decode = dev["context_lens"].shape[0]
        slots, pages, mask = dev["decode_slots"], None, None
        only = prefills[0] if len(prefills) == 1 else None
        causal = only is not None and only.end - only.start == only.context_len
        if prefills:
            pages, first = dev["prefill_pages"], dev["prefill_first"]
            positions = dev["positions"][num_decode:]
            slots = torch.cat((slots, self._prefill_slots(pages, first, positions)))
            if not causal:
                mask = self._prefill_mask(first, positions, pages.numel())
        return ForwardMeta(
            positions=dev["positions"],
            slot_mapping=slots,
            num_decode=num_decode,
            block_tables=dev["block_tables"],
            context_lens=dev["context_lens"],
            prefill_pages=pages,
            prefill_mask=mask,
            prefill_causal=causal,
            logits_rows=dev["logits_rows"],
            lora=lora,
        )

    def _prefill_mask(
        self, first: torch.Tensor, positions: torch.Tensor, num_pages: int
    ) -> torch.Tensor:
        """[group * N_p, P * page_size] bool (ForwardMeta.prefill_mask): row i sees the slots
        first[i] .. first[i] + positions[i] of the gathered pages, its request's tokens up to
        its own position, built on the device from the two [N_p] vectors."""
        slots = torch.arange(num_pages * self.page_size, device=first.device)
        mask = (slots >= first[:, None]) & (slots <= (first + positions)[:, None])
        return mask.repeat(self.query_group, 1)

    def _prefill_slots(
        self, pages: torch.Tensor, first: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """[N_p] the KV slot of each prefill row: page positions // page_size of its chunk's
        pages (which start at page first // page_size of the gathered ones), offset
        positions % page_size."""
        size = self.page_size
        return pages[first // size + positions // size] * size + positions % size
