"""Per-step LoRA batch metadata and its application through the SGMV ops."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from shard.model.lora_weights import AdapterWeights
from shard.model.projections import LORA_GROUPS, MAX_GROUP_PROJECTIONS
from shard.ops.sgmv import sgmv_expand, sgmv_shrink


def group_key(modules: Iterable[str]) -> str:
    """The LoraBatch.groups key of a group of modules, e.g. ``q_proj+k_proj+v_proj``."""
    return "+".join(modules)


GROUP_KEYS = frozenset(group_key(g) for g in LORA_GROUPS)


@dataclass(frozen=True, slots=True)
class LoraGroup:
    """Weights of a group's P projections for every segment of the batch."""

    a_ptrs: torch.Tensor  # [P, S] int64: address of each A stack [L, r_ps, in_local] (0: none)
    b_ptrs: torch.Tensor  # [P, S] int64: address of each B stack [L, r_ps, out_local_p]
    ranks: torch.Tensor  # [P, S] int32: r_ps, 0 where the segment's adapter skips projection p
    scales: torch.Tensor  # [P, S] float32: alpha / r (or alpha / sqrt(r) for rsLoRA)


@dataclass(frozen=True, slots=True)
class LoraBatch:
    """Rows of a forward grouped into adapter segments, and each projection group's weights."""

    seg_starts: torch.Tensor  # [S + 1] int32: row offsets of the segments
    groups: dict[str, LoraGroup]  # by group_key; missing: no segment targets any of its modules
    buffer: torch.Tensor  # [T, MAX_GROUP_PROJECTIONS * r_max] scratch for x @ A of one group


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
    (num_segments, rank, num_rows), and every group is present.
    """
    if not starts or starts[0] != 0:
        # The expand writes the delta only inside segments: they must cover every row.
        raise ValueError(f"segments must start at row 0, got starts {list(starts)[:4]}")
    pad = (num_segments or len(starts)) - len(starts)
    if pad < 0:
        raise ValueError(f"{len(starts)} segments do not fit a batch padded to {num_segments}")
    ws = [*weights, *([None] * pad)]
    bounds = [*starts, *([num_rows] * (pad + 1))]
    max_rank = max((w.rank for w in ws if w is not None), default=1)
    if rank is not None and rank < max_rank:
        raise ValueError(f"rank {max_rank} does not fit a batch padded to rank {rank}")

    def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    groups = {}
    for modules in LORA_GROUPS:
        # per_seg[p][s]: segment s's adapter if it targets modules[p], else None
        per_seg = [[w if w is not None and m in w.a else None for w in ws] for m in modules]
        if num_segments is None and all(w is None for row in per_seg for w in row):
            continue
        pairs = list(zip(modules, per_seg, strict=True))
        a_ptrs = [[w.a[m].data_ptr() if w else 0 for w in row] for m, row in pairs]
        b_ptrs = [[w.b[m].data_ptr() if w else 0 for w in row] for m, row in pairs]
        groups[group_key(modules)] = LoraGroup(
            a_ptrs=tensor(a_ptrs, torch.int64),
            b_ptrs=tensor(b_ptrs, torch.int64),
            ranks=tensor([[w.rank if w else 0 for w in row] for row in per_seg], torch.int32),
            scales=tensor([[w.scale if w else 0.0 for w in row] for row in per_seg], torch.float32),
        )
    return LoraBatch(
        seg_starts=tensor(bounds, torch.int32),
        groups=groups,
        buffer=torch.empty(
            num_rows, MAX_GROUP_PROJECTIONS * (rank or max_rank), dtype=dtype, device=device
        ),
    )


@dataclass(frozen=True, slots=True)
class PendingLora:
    """A group's LoRA term, issued by `start_lora` and read by `finish_lora`."""

    delta: torch.Tensor  # [T, sum(widths)]: scale_s * x @ A_s @ B_s per projection and segment
    side: torch.cuda.Stream | None  # the stream computing it; None: the current one


# While a CUDA graph is captured, a group's shrink and expand run on a side stream beside the
# base GEMM, into a delta buffer that the elementwise chain after the projection adds. At 7B
# batch 32 (32 distinct adapters) that decode step took 7.81 ms against 8.40 ms with the LoRA
# after the GEMM on one stream, and 8.10 ms with only the shrink beside it
# (benchmarks/NOTES.md). In a graph the fork and join are free edges; in an eager step
# (one that holds a prefill) they are two event records and waits per group and layer on the
# host, which such a step, bound by its host time, cannot hide: eager steps use one stream.
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _forks(x: torch.Tensor) -> bool:
    """Whether this group's LoRA runs on the side stream: CUDA, inside a capture."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def start_lora(
    x: torch.Tensor,
    lora: LoraBatch | None,
    modules: Sequence[str],
    widths: Sequence[int],
    layer_idx: int,
) -> PendingLora | None:
    """Issues the LoRA term of `modules` (a LORA_GROUPS group, projection p into `widths[p]`
    output columns) for every segment of the batch; None when no segment's adapter targets it.

    Call it before the base projection of the same x: inside a CUDA graph capture the work runs
    on a side stream forked from the current one, so its tail hides under the base GEMM (both
    only read x), and `finish_lora` joins it; fork and join are graph edges. The previous
    group's expand has read the shared scratch buffer by the fork point."""
    if lora is None:
        return None
    group = lora.groups.get(group_key(modules))
    if group is None:
        return None
    r_max = lora.buffer.shape[1] // MAX_GROUP_PROJECTIONS
    v = lora.buffer[: x.shape[0], : len(modules) * r_max]  # [T, P * r_max]
    # Allocated on the current stream, which joins the side stream before it frees the delta;
    # the expand writes every row of it (zeros where a segment has no adapter), so no memset.
    delta = x.new_empty(x.shape[0], sum(widths))
    side = _side_stream(x.device) if _forks(x) else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):  # no-op for None
        sgmv_shrink(v, x, group.a_ptrs, lora.seg_starts, group.ranks, layer_idx)
        tables = (group.b_ptrs, lora.seg_starts, group.ranks, group.scales)
        sgmv_expand(delta, v, *tables, layer_idx, widths, accumulate=False)
    return PendingLora(delta, side)


def finish_lora(pending: PendingLora | None) -> torch.Tensor | None:
    """The LoRA term [T, sum(widths)] of what `start_lora` issued (zero in rows whose adapter
    skips a projection), for the caller to add to the base projection inside the elementwise
    chain that follows it; None without one.

    Joining first also orders every later use of x, of the scratch buffer and of the delta on
    the current stream after the side stream's work, so the caching allocator may reuse them."""
    if pending is None:
        return None
    if pending.side is not None:
        torch.cuda.current_stream(pending.delta.device).wait_stream(pending.side)
    return pending.delta
