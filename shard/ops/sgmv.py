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

Index tensors live on ``x``'s device: ``a_ptrs``/``b_ptrs [S]`` int64, ``seg_starts [S + 1]``
int32, ``ranks [S]`` int32, ``scales [S]`` float32. Products accumulate in float32. Both ops write
into the given outputs and allocate nothing on CUDA, so they can be captured in a CUDA graph.
CUDA tensors (float16/bfloat16, ranks up to 128, h a multiple of 8, 16-byte aligned stacks) run
the kernels of ``csrc/``; CPU tensors run the plain-torch reference, which takes the same
arguments (the pointers are host addresses there).

On sm_90 the kernels use programmatic dependent launch: they start reading the weights and the
index tensors while the kernel just before them on the stream still runs, so that kernel must not
write those (weights and segment metadata are written earlier in a step, as usual).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import torch
from torch import Tensor


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
) -> None:
    """``y[t] += scales[s] * (v[t, :r_s] @ B_s[layer_idx])`` (see the module docstring)."""
    if v.is_cuda:
        _ops().sgmv_expand(y, v, b_ptrs, seg_starts, ranks, scales, layer_idx)
    else:
        sgmv_expand_reference(y, v, b_ptrs, seg_starts, ranks, scales, layer_idx)


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
    for ptr, rank, lo, hi in _segments(a_ptrs, seg_starts, ranks, v.shape[1]):
        if ptr:
            a = _layer_view(ptr, layer_idx, rank, h_in, x.dtype)  # [r, h_in]
            v[lo:hi, :rank] = (x[lo:hi].float() @ a.float().T).to(v.dtype)


def sgmv_expand_reference(
    y: Tensor,
    v: Tensor,
    b_ptrs: Tensor,
    seg_starts: Tensor,
    ranks: Tensor,
    scales: Tensor,
    layer_idx: int,
) -> None:
    """Plain-torch :func:`sgmv_expand` for CPU tensors (pointers are host addresses)."""
    h_out = y.shape[1]
    segments = _segments(b_ptrs, seg_starts, ranks, v.shape[1])
    for (ptr, rank, lo, hi), scale in zip(segments, scales.tolist(), strict=True):
        if ptr:
            b = _layer_view(ptr, layer_idx, rank, h_out, v.dtype)  # [r, h_out]
            delta = (v[lo:hi, :rank].float() @ b.float()) * scale  # [rows, h_out]
            y[lo:hi] = (y[lo:hi].float() + delta).to(y.dtype)


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


def _ops():  # the torch.ops.lorafleet namespace, once the extension is loaded
    from shard.ops.build import load_extension

    load_extension()
    return torch.ops.lorafleet
