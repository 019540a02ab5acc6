"""Everything that touches torch.distributed: the tensor-parallel group and its collectives."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


class GroupLost(RuntimeError):
    """A collective failed: a rank died, closed its connection or stopped answering within the
    group timeout. The group cannot recover; the shard must go down so the pod restarts."""


@dataclass(frozen=True, slots=True)
class TPGroup:
    """This process's place in its tensor-parallel group; size 1 means no collectives at all."""

    rank: int = 0
    size: int = 1
    # The group of the layers' collectives (NCCL on CUDA, gloo on CPU).
    tensors: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    # gloo group for step plans and heartbeats: CPU-side, so a plan needs no device sync, and
    # apart from `tensors`, so a heartbeat thread never interleaves with a forward's ops.
    meta: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)

    def split(self, n: int, what: str) -> int:
        """Size of this rank's slice of a dimension of `n` that is divided evenly across ranks."""
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {self.size}")
        return n // self.size


SINGLE = TPGroup()


def init_group(
    rank: int,
    size: int,
    device: torch.device,
    timeout_s: float = 120.0,
    startup_timeout_s: float = 600.0,
) -> TPGroup:
    """Joins the tensor-parallel group: env:// rendezvous (torchrun or the spawner sets
    MASTER_ADDR/MASTER_PORT) waiting up to `startup_timeout_s` for every rank to start, then a
    tensor group (NCCL for CUDA, gloo otherwise) and a gloo metadata group whose collectives
    fail with GroupLost after `timeout_s` instead of waiting forever."""
    if size == 1:
        return SINGLE
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # The ranks share the host's cores: with a full-size intra-op pool each, two ranks slicing
    # adapters at once ran 10x slower (2.5 s instead of 0.2 s per 7B r16 adapter, 2 x H200).
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The world group only bootstraps (it runs no collective), so its long timeout is harmless.
    dist.init_process_group(
        "gloo", rank=rank, world_size=size, timeout=timedelta(seconds=startup_timeout_s)
    )
    timeout = timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    tensors = dist.new_group(backend=backend, timeout=timeout)
    meta = dist.new_group(backend="gloo", timeout=timeout)
    # NCCL builds its communicator at the first collective, which must not be inside a CUDA
    # graph capture: make it now.
    dist.all_reduce(torch.zeros(1, device=device), group=tensors)
    return TPGroup(rank=rank, size=size, tensors=tensors, meta=meta)


@contextmanager
def _collective(op: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, GroupLost):
            raise
        raise GroupLost(f"tensor-parallel {op} failed (a rank is gone?): {e}") from e


def all_reduce(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Sums `x` over the group in place."""
    if group.size > 1:
        with _collective("all_reduce"):
            dist.all_reduce(x, group=group.tensors)
    return x


def all_gather_last_dim(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Concatenates every rank's `x` along the last dimension."""
    if group.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group.size)]
    with _collective("all_gather"):
        dist.all_gather(parts, x.contiguous(), group=group.tensors)
    return torch.cat(parts, dim=-1)


def broadcast_object(obj: object, group: TPGroup) -> object:
    """Sends a picklable object from rank 0 to every rank over the metadata group; returns it
    everywhere. A follower waiting here gives up after the group timeout, so rank 0 must send
    something (a heartbeat) more often than that."""
    if group.size == 1:
        return obj
    box = [obj]
    with _collective("broadcast"):
        dist.broadcast_object_list(box, src=0, group=group.meta)
    return box[0]


def gather_object(obj: object, group: TPGroup) -> list[object]:
    """Every rank's picklable `obj` in rank order on rank 0 (an empty list elsewhere), over the
    metadata group: how followers answer a message of rank 0's."""
    if group.size == 1:
        return [obj]
    out: list[object] | None = [None] * group.size if group.rank == 0 else None
    with _collective("gather"):
        dist.gather_object(obj, out, dst=0, group=group.meta)
    return out or []


def destroy(group: TPGroup) -> None:
    """Leaves the group at process exit. An NCCL group is left to the process's end: its teardown
    after decode graphs were captured over it blocked a rank for good (2 x H200, torch 2.11,
    NCCL 2.28)."""
    if group.size == 1 or not dist.is_initialized():
        return
    if group.tensors is not None and dist.get_backend(group.tensors) == "nccl":
        return
    dist.destroy_process_group()
