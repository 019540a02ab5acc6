"""RMSNorm, optionally fused with the residual add in front of it."""

from __future__ import annotations

import torch
from torch import nn

from shard.model.fusion import elementwise
from shard.model.layers.placement import Placement


def _normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


# Two compiled chains over one plain body: a compiled function must not call another.
rms_norm = elementwise(_normalize)


@elementwise
def add_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor,
    lora: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta [+ lora]), x + delta [+ lora]): the residual add (of a projection and
    its LoRA term) and the norm after it in one chain."""
    total = x + delta if lora is None else x + (delta + lora)
    return _normalize(total, weight, eps), total


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the reference implementation."""

    def __init__(self, size: int, eps: float, at: Placement) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(size, dtype=at.dtype, device=at.device), requires_grad=False
        )

    def forward(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None = None,
        lora: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, residual): the residual stream x, plus `delta` (a projection's output) and
        its LoRA term `lora` when given, and its norm."""
        if delta is None:
            return rms_norm(x, self.weight, self.eps), x
        return add_rms_norm(x, delta, lora, self.weight, self.eps)
