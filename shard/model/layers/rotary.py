"""Rotary position embedding (rotate-half layout, as in HF Llama), with Llama 3 scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from shard.model.config import RopeScaling
from shard.model.fusion import elementwise


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies; Llama 3 scaling stretches the low ones."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv.float()
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled).float()


class RotaryEmbedding(nn.Module):
    """RoPE angle tables; `tables` picks the rows' positions, `rope_qkv` applies them."""

    cos: torch.Tensor  # buffers, registered in __init__
    sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: RopeScaling | None,
        device: torch.device,
    ) -> None:
        super().__init__()
        inv = inverse_frequencies(head_dim, theta, scaling).to(device)
        angles = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), inv)
        # [max_positions, head_dim // 2] each
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim // 2] of each row's position: gathered once per step and
        shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


@elementwise
def rope_qkv(
    qkv: torch.Tensor,
    lora: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merged projection [T, (heads + 2 kv_heads) * d], plus its LoRA term when given, split
    into q [T, heads, d] and k [T, kv_heads, d] rotated by the `tables` of their rows, and v
    [T, kv_heads, d]: one chain."""
    if lora is not None:
        qkv = qkv + lora
    q, k, v = qkv.view(qkv.shape[0], heads + 2 * kv_heads, -1).split(
        (heads, kv_heads, kv_heads), dim=1
    )
    return _rotate_half(q, cos, sin), _rotate_half(k, cos, sin), v


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
