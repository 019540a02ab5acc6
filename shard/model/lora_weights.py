"""One version of one adapter's LoRA weights on this rank: what the adapters package loads and
the model's LoRA layers apply, so it sits below both."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shard.model.projections import LORA_MODULES


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """One version of one adapter's LoRA weights for this rank, stacked over layers."""

    adapter_id: str
    digest: str  # sha256 of adapter_model.safetensors (hex)
    version: str  # 16 hex digits over the config and the weights: what makes a new version
    rank: int
    scale: float
    a: dict[str, torch.Tensor]  # module -> [L, r, in_local]
    b: dict[str, torch.Tensor]  # module -> [L, r, out_local]
    # (key, lowest A address): which version and where its weights sit, what a decode step's
    # LoRA tables depend on (the engine's decode graphs read it every step).
    placement: tuple[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        first = min((t.data_ptr() for t in self.a.values()), default=0)
        object.__setattr__(self, "placement", (self.key, first))

    @property
    def key(self) -> str:
        """`id@version`: how the engine names this version (ids never contain '@')."""
        return f"{self.adapter_id}@{self.version}"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(m for m in LORA_MODULES if m in self.a)
