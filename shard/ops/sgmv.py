"""SGMV: LoRA shrink and expand over a batch whose rows are grouped by adapter.

Semantics
---------
Rows of a batch are sorted so that each adapter's rows are contiguous: segment ``s`` owns rows
``seg_starts[s] <= t < seg_starts[s + 1]``. Each adapter stores, per projection, two contiguous
row-major stacks in the model dtype: ``A [L, r_s, h_in]`` and ``B [L, r_s, h_out]``; a segment
passes the ``data_ptr()`` of its stacks and its rank ``r_s`` (0: the segment has no adapter).

``sgmv_shrink(v, x, a_ptrs, seg_starts, ranks, layer_idx)``::

    v[t, :r_s] = x[t] @ A_s[layer_idx].T        # v [T, r_max] written, x [T, h_in]

Columns ``r_s..r_max`` of those rows are don't-care; rows of rank-0 segments are left untouched.

``sgmv_expand(y, v, b_ptrs, seg_starts, ranks, scales, layer_idx)``::

    y[t] += scales[s] * (v[t, :r_s] @ B_s[layer_idx])   # y [T, h_out], v [T, r_max]

``y`` may be a column slice of a wider tensor (``stride(1) == 1``, any row stride). Rows outside
every segment or in rank-0 segments are untouched.

With ``accumulate=False`` the expand writes instead of adding, ``y[t] = scales[s] * (...)``, and
writes zeros in the rows of rank-0 segments (rows outside every segment stay untouched): a caller
that wants the LoRA term alone gets it without zeroing ``y`` first or reading it back.

Several projections of the same rows (q/k/v, gate/up: up to 4) run in one launch when the weight
tables are ``[P, S]`` (``a_ptrs``, ``b_ptrs``, ``ranks``, ``scales``): ``v [T, P * r_max]`` holds
projection ``p``'s result in columns ``p * r_max ..``, the shrink reads one ``x`` for all of them,
and the expand adds projection ``p`` into the ``widths[p]`` columns of ``y`` that follow those of
projections ``0..p-1``::

    vp = v[:, p*r_max : (p+1)*r_max]
    vp[t, :r_ps] = x[t] @ A_ps[layer_idx].T
    y[t, off_p : off_p + widths[p]] += scales[p, s] * (vp[t, :r_ps] @ B_ps[layer_idx])

Index tensors live on ``x``'s device: ``a_ptrs``/``b_ptrs [S]`` int64, ``seg_starts [S + 1]``
int32, ``ranks [S]`` int32, ``scales [S]`` float32. Products accumulate in float32. Both ops write
into the given outputs and allocate nothing on CUDA, so they can be captured in a CUDA graph.
CUDA tensors (float16/bfloat16, ranks up to 128, h a multiple of 8, 16-byte aligned stacks) run
the kernels of ``csrc/``; CPU tensors run the plain-torch reference, which takes the same
arguments (the pointers are host addresses there).

On sm_90 the kernels use programmatic dependent launch: they start reading the weights and the
index tensors while the kernel just before them on the stream still runs, so that kernel must not
write those (weights and segment metadata are written earlier in a step, as usual).
``LORAFLEET_SM80=1`` (a build of its own, see ``shard.ops.build``) makes a Hopper GPU take the sm_80
launch paths (no PDL, no clusters), so that they are tested where only Hopper GPUs are at hand.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from shard.ops.build import ops as _ops


def sgmv_shrink(
    v: Tensor, x: Tensor, a_ptrs: Tensor, seg_starts: Tensor, ranks: Tensor, layer_idx: int
) -> None:
    """``v[t, :r_s] = x[t] @ A_s[layer_idx].T`` for every segment (see the module docstring)."""
    if x.is_cuda:
        _ops().sgmv_shrink(v, x, a_ptrs, seg_starts, ranks, layer_idx)
    else:
        sgmv_shrink_reference(v, x, a_ptrs, seg_starts, ranks, layer_idx)


def sgmv_expand(
    y: Tensor,
    v: Tensor,
    b_ptrs: Tensor,
    seg_starts: Tensor,
    ranks: Tensor,
    scales: Tensor,
    layer_idx: int,
    widths: Sequence[int] | None = None,
    *,
    accumulate: bool = True,
) -> None:
    """``y[t] += scales[s] * (v[t, :r_s] @ B_s[layer_idx])`` (see the module docstring).

    ``widths``: the output width of each projection of ``[P, S]`` tables (default: ``y``'s).
    ``accumulate=False``: ``y[t] =`` instead, zero in rank-0 segments.
    """
    widths = [y.shape[1]] if widths is None else list(widths)
    args = (y, v, b_ptrs, seg_starts, ranks, scales, layer_idx, widths)
    if v.is_cuda:
        _ops().sgmv_expand(*args, accumulate)
    else:
        sgmv_expand_reference(*args, accumulate=accumulate)


def weight_ptrs(stacks: Sequence[Tensor | None], device: torch.device | str) -> Tensor:
    """``[S]`` int64 pointers of per-segment weight stacks (``None``: no adapter, pointer 0)."""
    for w in stacks:
        if w is not None and not w.is_contiguous():
            raise ValueError("adapter weight stacks must be contiguous")
    ptrs = [0 if w is None else w.data_ptr() for w in stacks]
    return torch.tensor(ptrs, dtype=torch.int64, device=device)


def sgmv_shrink_reference(
    v: Tensor, x: Tensor, a_ptrs: Tensor, seg_starts: Tensor, ranks: Tensor, layer_idx: int
) -> None:
    """Plain-torch :func:`sgmv_shrink` for CPU tensors (pointers are host addresses)."""
    h_in = x.shape[1]
    for vp, ptrs, rs in zip(_column_blocks(v, a_ptrs), _table(a_ptrs), _table(ranks), strict=True):
        for ptr, rank, lo, hi in _segments(ptrs, seg_starts, rs, vp.shape[1]):
            if ptr:
                a = _layer_view(ptr, layer_idx, rank, h_in, x.dtype)  # [r, h_in]
                vp[lo:hi, :rank] = (x[lo:hi].float() @ a.float().T).to(v.dtype)


def sgmv_expand_reference(
    y: Tensor,
    v: Tensor,
    b_ptrs: Tensor,
    seg_starts: Tensor,
    ranks: Tensor,
    scales: Tensor,
    layer_idx: int,
    widths: Sequence[int] | None = None,
    *,
    accumulate: bool = True,
) -> None:
    """Plain-torch :func:`sgmv_expand` for CPU tensors (pointers are host addresses)."""
    widths = [y.shape[1]] if widths is None else list(widths)
    if sum(widths) != y.shape[1]:
        raise ValueError(f"widths {widths} do not sum to y's {y.shape[1]} columns")
    if not accumulate:
        bounds = seg_starts.tolist()
        y[bounds[0] : bounds[-1]] = 0
    ys = y.split(widths, dim=1)
    vs = _column_blocks(v, b_ptrs)
    tables = zip(ys, vs, _table(b_ptrs), _table(ranks), _table(scales), strict=True)
    for yp, vp, ptrs, rs, ss in tables:
        segments = _segments(ptrs, seg_starts, rs, vp.shape[1])
        for (ptr, rank, lo, hi), scale in zip(segments, ss.tolist(), strict=True):
            if ptr:
                b = _layer_view(ptr, layer_idx, rank, yp.shape[1], v.dtype)  # [r, h_out_p]
                delta = (vp[lo:hi, :rank].float() @ b.float()) * scale  # [rows, h_out_p]
                yp[lo:hi] = (yp[lo:hi].float() + delta).to(y.dtype)


def _table(t: Tensor) -> Tensor:
    """A per-projection table as ``[P, S]`` (a ``[S]`` table is one projection)."""
    return t.view(1, -1) if t.dim() == 1 else t


def _column_blocks(v: Tensor, table: Tensor) -> tuple[Tensor, ...]:
    """``v [T, P * r_max]`` as P column blocks ``[T, r_max]``, one per row of ``table``."""
    p = _table(table).shape[0]
    if v.shape[1] % p:
        raise ValueError(f"v's {v.shape[1]} columns do not split into {p} projections")
    return v.split(v.shape[1] // p, dim=1)


def _segments(
    ptrs: Tensor, seg_starts: Tensor, ranks: Tensor, r_max: int
) -> list[tuple[int, int, int, int]]:
    """(pointer, rank, first row, end row) per segment; pointer 0 where there is no work."""
    starts = seg_starts.tolist()
    out = []
    for s, (ptr, rank) in enumerate(zip(ptrs.tolist(), ranks.tolist(), strict=True)):
        lo, hi = starts[s], starts[s + 1]
        if rank > r_max:
            raise ValueError(f"segment {s} has rank {rank} > r_max {r_max}")
        busy = rank > 0 and hi > lo
        if busy and ptr == 0:
            raise ValueError(f"segment {s} has rank {rank} but a null weight pointer")
        out.append((ptr if busy else 0, rank, lo, hi))
    return out


def _layer_view(ptr: int, layer_idx: int, rank: int, width: int, dtype: torch.dtype) -> Tensor:
    """``[rank, width]`` view of layer ``layer_idx`` of the stack at host address ``ptr``."""
    count = rank * width
    offset = layer_idx * count * dtype.itemsize
    return _host_view(ptr + offset, (rank, width), dtype)


def _host_view(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A tensor aliasing ``prod(shape)`` elements of ``dtype`` at host address ``ptr``."""
    count = math.prod(shape)
    buf = (ctypes.c_byte * (count * dtype.itemsize)).from_address(ptr)
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)
