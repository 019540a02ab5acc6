"""Everything one forward needs besides the token ids, in one object."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.layers.lora import LoraBatch


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    """A request whose new rows are more than one token (a prompt, or a resumed request)."""

    start: int  # first row of the request in the batch
    end: int  # one past its last row
    context_len: int  # tokens in its KV after this step (cached prefix + the new rows)
    pages: torch.Tensor  # [ceil(context_len / page_size)] int64 its page ids, in order


@dataclass(frozen=True, slots=True)
class ForwardMeta:
    """Positions, KV slots, page tables and adapter segments of one forward.

    Rows [0, num_decode) are decode rows (one per request, attended through the paged kernel);
    the rest belong to prefill spans. Within each group rows are sorted by adapter so that LoRA
    segments are contiguous.
    """

    positions: torch.Tensor  # [T] int64 absolute position of each row
    slot_mapping: torch.Tensor  # [T] int64 KV slot (page * page_size + offset) each row writes
    num_decode: int
    block_tables: torch.Tensor  # [num_decode, max_pages] int32 page ids of each decode request
    context_lens: torch.Tensor  # [num_decode] int32 tokens in each decode request's KV
    prefills: tuple[PrefillSpan, ...]
    logits_rows: torch.Tensor  # [B] int64 the last row of each request: its logits are sampled
    lora: LoraBatch | None
