"""Everything one forward needs besides the token ids, in one object."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.model.layers.lora import LoraBatch


@dataclass(frozen=True, slots=True)
class ForwardMeta:
    """Positions, KV slots, page tables and adapter segments of one forward.

    Rows [0, num_decode) are decode rows (one per request, attended through the paged kernel);
    the other N_p rows belong to prefill chunks, which attend together in one call: to the keys
    of every chunk's pages, gathered, under `prefill_mask` (or, for one fresh prompt, causally
    to their own keys). Within each group rows are sorted by
    adapter so that LoRA segments are contiguous.
    """

    positions: torch.Tensor  # [T] int64 absolute position of each row
    slot_mapping: torch.Tensor  # [T] int64 KV slot (page * page_size + offset) each row writes
    num_decode: int
    block_tables: torch.Tensor  # [num_decode, max_pages] int32 page ids of each decode request
    context_lens: torch.Tensor  # [num_decode] int32 tokens in each decode request's KV
    # [P] int64 the pages of every prefill chunk's context (earlier chunks and its own rows),
    # chunk after chunk; their P * page_size slots are the keys the prefill rows attend to.
    prefill_pages: torch.Tensor | None
    # [group * N_p, P * page_size] bool: may prefill row i see key slot j. Row g * N_p + i is row
    # i for the g-th query head of each KV head (group = query heads per KV head): the queries
    # of a KV head's group are stacked as rows, so keys and values are never repeated per head.
    prefill_mask: torch.Tensor | None
    # The prefill rows are one request's whole context (one prompt, nothing cached before it):
    # they attend causally to their own keys, with no gather and no mask (flash on CUDA).
    prefill_causal: bool
    logits_rows: torch.Tensor  # [B] int64 the last row of each sampled request
    lora: LoraBatch | None
