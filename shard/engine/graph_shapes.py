"""The fixed shapes decode steps are padded to and captured for: batch buckets, page-table width
classes (LoRA rank classes are the kernels', `shard.adapters.lora_ranks`), and a shape's key."""

from __future__ import annotations

from dataclasses import dataclass

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_TABLE_WIDTH = 8


def ceil_to(value: int, classes: tuple[int, ...]) -> int | None:
    """The smallest class >= value, or None when value is above every class."""
    return next((c for c in classes if c >= value), None)


def table_width(pages: int) -> int:
    """Page-table width class: the next power of two, so few graphs cover every context."""
    width = MIN_TABLE_WIDTH
    while width < pages:
        width *= 2
    return width


def width_classes(max_pages: int) -> tuple[int, ...]:
    """Every page-table width class of a step whose requests hold at most `max_pages` pages."""
    widths = [MIN_TABLE_WIDTH]
    while widths[-1] < max_pages:
        widths.append(widths[-1] * 2)
    return tuple(widths)


@dataclass(frozen=True, slots=True)
class GraphKey:
    batch: int  # padded number of decode rows
    rank: int  # LoRA rank class; 0: no adapter in the batch
    width: int  # page-table width class


def warm_keys(max_batch: int, ranks: tuple[int, ...], widths: tuple[int, ...]) -> list[GraphKey]:
    """The shapes of these rank classes and widths for every batch bucket up to the one that
    `max_batch` rows pad to, in capture order: largest batch first, so that smaller graphs reuse
    the pool memory the larger ones freed."""
    limit = ceil_to(max_batch, BATCH_BUCKETS) or max_batch
    batches = sorted((b for b in BATCH_BUCKETS if b <= limit), reverse=True)
    return [GraphKey(b, r, w) for b in batches for r in ranks for w in widths]
