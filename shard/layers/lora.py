"""Per-step LoRA batch metadata and its application through the SGMV ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.ops.sgmv import sgmv_expand, sgmv_shrink

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
