"""Vocabulary-parallel token embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shard.model.layers.placement import Placement
from shard.parallel.group import all_gather_last_dim, all_reduce


class VocabParallel(nn.Module):
    """Holds this rank's rows of a [vocab, hidden] matrix (padded so ranks split it evenly).

    Used as the token embedding (`embed`) and as the LM head (`logits`); a tied model shares one.
    """

    def __init__(self, vocab_size: int, hidden: int, at: Placement) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.group = at.group
        self.rows = -(-vocab_size // at.group.size)
        self.start = at.group.rank * self.rows
        self.weight = nn.Parameter(
            torch.zeros(self.rows, hidden, dtype=at.dtype, device=at.device), requires_grad=False
        )

    def load(self, full: torch.Tensor) -> None:
        part = full[self.start : self.start + self.rows]
        self.weight.data[: part.shape[0]].copy_(part)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, hidden]."""
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight) * inside.unsqueeze(-1)
        return all_reduce(out, self.group)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> float32 logits [B, vocab]."""
        local = F.linear(hidden, self.weight).float()
        return all_gather_last_dim(local, self.group)[:, : self.vocab_size]
