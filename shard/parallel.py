"""Everything that touches torch.distributed: the tensor-parallel group and its collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TPGroup:
    """This process's place in its tensor-parallel group; size 1 means no collectives at all."""

    rank: int = 0
    size: int = 1

    def split(self, n: int, what: str) -> int:
        """Size of this rank's slice of a dimension of `n` that is divided evenly across ranks."""
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {self.size}")
        return n // self.size


SINGLE = TPGroup()


def init_group(rank: int, size: int, device: torch.device, timeout_s: float = 120.0) -> TPGroup:
    """Joins the process group (NCCL for CUDA, gloo otherwise); env:// rendezvous (torchrun or
    the spawner sets MASTER_ADDR/MASTER_PORT)."""
    if size == 1:
        return SINGLE
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(
        backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s)
    )
    return TPGroup(rank=rank, size=size)


def all_reduce(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Sums `x` over the group in place."""
    if group.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Concatenates every rank's `x` along the last dimension."""
    if group.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_object(obj: object, group: TPGroup) -> object:
    """Sends a picklable object from rank 0 to every rank; returns it everywhere."""
    if group.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy(group: TPGroup) -> None:
    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
