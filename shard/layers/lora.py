"""Per-step LoRA batch metadata and its application through the SGMV ops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shard.ops.sgmv import sgmv_expand, sgmv_shrink

if TYPE_CHECKING:
    from shard.adapter_loader import AdapterWeights

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class LoraProjection:
    """Weights of one projection for every segment of the batch."""

    a_ptrs: torch.Tensor  # [S] int64: address of each segment's A stack [L, r_s, in_local]
    b_ptrs: torch.Tensor  # [S] int64: address of each segment's B stack [L, r_s, out_local]
    ranks: torch.Tensor  # [S] int32: r_s, 0 where the segment's adapter skips this projection
    scales: torch.Tensor  # [S] float32: alpha / r (or alpha / sqrt(r) for rsLoRA)


@dataclass(frozen=True, slots=True)
class LoraBatch:
    """Rows of a forward grouped into adapter segments, and each projection's weights."""

    seg_starts: torch.Tensor  # [S + 1] int32: row offsets of the segments
    projections: dict[str, LoraProjection]  # by HF module name; missing: no segment targets it
    buffer: torch.Tensor  # [T, r_max] scratch for x @ A


def build_lora_batch(
    starts: Sequence[int],
    weights: Sequence[AdapterWeights | None],
    num_rows: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    num_segments: int | None = None,
    rank: int | None = None,
) -> LoraBatch:
    """The LoraBatch of segments starting at rows `starts` with these adapters (None: base rows).

    `num_segments` and `rank` pad the batch to fixed shapes (empty rank-0 segments, a wider
    scratch buffer) so that a CUDA graph captured with one padded batch replays any other batch
    of the same padded shape after a leaf-by-leaf copy: every leaf's shape depends only on
    (num_segments, rank, num_rows).
    """
    pad = (num_segments or len(starts)) - len(starts)
    if pad < 0:
        raise ValueError(f"{len(starts)} segments do not fit a batch padded to {num_segments}")
    ws = [*weights, *([None] * pad)]
    bounds = [*starts, *([num_rows] * (pad + 1))]
    max_rank = max((w.rank for w in ws if w is not None), default=1)
    if rank is not None and rank < max_rank:
        raise ValueError(f"rank {max_rank} does not fit a batch padded to rank {rank}")

    def tensor(values: list[int] | list[float], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    projections = {}
    for module in LORA_MODULES:
        per_seg = [w if w is not None and module in w.a else None for w in ws]
        if all(w is None for w in per_seg) and num_segments is None:
            continue
        projections[module] = LoraProjection(
            a_ptrs=tensor([w.a[module].data_ptr() if w else 0 for w in per_seg], torch.int64),
            b_ptrs=tensor([w.b[module].data_ptr() if w else 0 for w in per_seg], torch.int64),
            ranks=tensor([w.rank if w else 0 for w in per_seg], torch.int32),
            scales=tensor([w.scale if w else 0.0 for w in per_seg], torch.float32),
        )
    return LoraBatch(
        seg_starts=tensor(bounds, torch.int32),
        projections=projections,
        buffer=torch.empty(num_rows, rank or max_rank, dtype=dtype, device=device),
    )


def add_lora(
    y: torch.Tensor, x: torch.Tensor, lora: LoraBatch | None, module: str, layer_idx: int
) -> None:
    """y[T, out] += scale_s * x @ A_s @ B_s for every segment s whose adapter targets `module`."""
    if lora is None:
        return
    proj = lora.projections.get(module)
    if proj is None:
        return
    v = lora.buffer[: x.shape[0]]
    sgmv_shrink(v, x, proj.a_ptrs, lora.seg_starts, proj.ranks, layer_idx)
    sgmv_expand(y, v, proj.b_ptrs, lora.seg_starts, proj.ranks, proj.scales, layer_idx)
