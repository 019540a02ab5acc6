"""Column- and row-parallel linears with per-parameter weight loaders and LoRA on the right side
of each collective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shard.model.layers.lora import GROUP_KEYS, LoraBatch, finish_lora, group_key, start_lora
from shard.model.layers.placement import Placement
from shard.parallel.group import all_reduce


class MergedColumnLinear(nn.Module):
    """Several projections of the same input fused along the output dimension (q/k/v, gate/up).

    Each projection is split across ranks by output rows, and so is its bias when it has one;
    LoRA keeps A whole and writes into this rank's output columns, so it needs no collective. The
    projections' LoRA runs as one group (one shrink and one expand launch for all of them).
    """

    def __init__(
        self,
        in_features: int,
        modules: dict[str, int],
        layer_idx: int,
        at: Placement,
        bias: bool = False,
    ) -> None:
        """`modules` maps each HF projection name to its LOCAL output width on this rank, in the
        order of a LORA_GROUPS group; `bias`: every projection has one (Qwen2's q/k/v)."""
        super().__init__()
        if group_key(modules) not in GROUP_KEYS:
            raise ValueError(f"{list(modules)} is not a LoRA projection group")
        self.layer_idx = layer_idx
        self.slices: dict[str, slice] = {}
        start = 0
        for name, width in modules.items():
            self.slices[name] = slice(start, start + width)
            start += width
        self.lora_modules = tuple(modules)
        self.lora_widths = tuple(modules.values())
        self.weight = nn.Parameter(
            torch.empty(start, in_features, dtype=at.dtype, device=at.device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(start, dtype=at.dtype, device=at.device), requires_grad=False)
            if bias
            else None
        )

    def load(self, module: str, full: torch.Tensor, rows: torch.Tensor | slice) -> None:
        """Copies this rank's rows `rows` of the checkpoint's `module` weight into place."""
        self.weight.data[self.slices[module]].copy_(full[rows])

    def load_bias(self, module: str, full: torch.Tensor, rows: torch.Tensor | slice) -> None:
        """Copies this rank's entries `rows` (the weight's rows) of `module`'s bias into place."""
        assert self.bias is not None, "the loader checks the architecture has biases"
        self.bias.data[self.slices[module]].copy_(full[rows])

    def forward(
        self, x: torch.Tensor, lora: LoraBatch | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x @ W.T + bias, its LoRA term or None): the caller adds the two in its next chain."""
        pending = start_lora(x, lora, self.lora_modules, self.lora_widths, self.layer_idx)
        y = F.linear(x, self.weight, self.bias)
        return y, finish_lora(pending)


class RowLinear(nn.Module):
    """A projection split across ranks by input columns, summed by one all-reduce.

    LoRA's A is split by the same input rows, so each rank adds its partial x_local @ A_local @ B
    before the all-reduce and the sum over ranks is exactly x @ A @ B.
    """

    def __init__(
        self,
        in_local: int,
        out_features: int,
        module: str,
        layer_idx: int,
        at: Placement,
    ) -> None:
        super().__init__()
        self.module = module
        self.layer_idx = layer_idx
        self.group = at.group
        self.weight = nn.Parameter(
            torch.empty(out_features, in_local, dtype=at.dtype, device=at.device),
            requires_grad=False,
        )

    def load(self, full: torch.Tensor, cols: slice) -> None:
        """Copies this rank's input columns `cols` of the checkpoint's weight into place."""
        self.weight.data.copy_(full[:, cols])

    def forward(
        self, x: torch.Tensor, lora: LoraBatch | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the all-reduced x @ W.T, its LoRA term or None): with one rank the caller adds the
        two in its next chain; across ranks each rank's partial term joins the all-reduce."""
        pending = start_lora(x, lora, (self.module,), (self.weight.shape[0],), self.layer_idx)
        y = F.linear(x, self.weight)
        delta = finish_lora(pending)
        if delta is not None and self.group.size > 1:
            y += delta
            delta = None
        return all_reduce(y, self.group), delta
