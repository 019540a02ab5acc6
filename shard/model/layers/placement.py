"""Where one rank's weights live."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.parallel.group import TPGroup


@dataclass(frozen=True, slots=True)
class Placement:
    """A rank's tensor-parallel group, and the dtype and device of its weights."""

    group: TPGroup
    dtype: torch.dtype
    device: torch.device
