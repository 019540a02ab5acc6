"""SGMV projection groups ([P, S] pointer tables: q/k/v or gate/up in one shrink and one
expand): the CPU reference against projection-by-projection calls, the CUDA ops against the
reference (GPU tests are marked ``gpu`` and skipped without CUDA)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from shard.model.layers.lora import build_lora_batch
from shard.ops import sgmv_expand, sgmv_shrink
from shard.ops.sgmv import sgmv_expand_reference, sgmv_shrink_reference
from tests.sgmv_problems import (
    NUM_LAYERS,
    POPULARITY,
    RANKS,
    TOL,
    Problem,
    check_shrink,
    expand_input,
    gpu,
    make_problem,
    naive_expand,
    naive_shrink,
    needs_cuda,
    random_stack,
    rel_err,
    replay_equals_eager,
)


def make_group(
    popularity: str,
    rows: int,
    h_in: int,
    widths: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
    base_rows: int = 0,
    empty_segments: int = 0,
) -> list[Problem]:
    """One Problem per projection, sharing x and the segments; each projection draws its own
    ranks, and skips (rank 0) about a fifth of the segments the first one serves."""
    first = make_problem(
        popularity,
        rows,
        h_in,
        widths[0],
        dtype,
        seed,
        base_rows=base_rows,
        empty_segments=empty_segments,
    )
    rng = random.Random(seed + 1)
    gen = torch.Generator().manual_seed(seed + 1)
    group = [first]
    for width in widths[1:]:
        ranks = [
            0 if r == 0 or rng.random() < 0.2 else rng.choice(RANKS) for r in first.ranks.tolist()
        ]
        group.append(
            Problem(
                x=first.x,
                a_stacks=[random_stack(r, h_in, dtype, gen) for r in ranks],
                b_stacks=[random_stack(r, width, dtype, gen) for r in ranks],
                seg_starts=first.seg_starts,
                ranks=torch.tensor(ranks, dtype=torch.int32),
                scales=torch.rand(len(ranks), generator=gen) + 0.5,
                r_max=first.r_max,
                h_out=width,
            )
        )
    return group


def group_tables(group: list[Problem]) -> tuple[torch.Tensor, ...]:
    """[P, S] a_ptrs, b_ptrs, ranks, scales of a group."""
    return (
        torch.stack([p.a_ptrs() for p in group]),
        torch.stack([p.b_ptrs() for p in group]),
        torch.stack([p.ranks for p in group]),
        torch.stack([p.scales for p in group]),
    )


def group_expand_input(group: list[Problem], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v [T, P * r_max] (NaN in don't-care columns) and y [T, sum of widths]."""
    pairs = [expand_input(p, seed + i) for i, p in enumerate(group)]
    return torch.cat([v for v, _ in pairs], dim=1), torch.cat([y for _, y in pairs], dim=1)


@pytest.mark.parametrize("widths", [(24, 8, 8), (40, 40)])
@pytest.mark.parametrize("popularity", ["distinct", "skewed"])
def test_reference_group_equals_projection_by_projection(
    widths: tuple[int, ...], popularity: str
) -> None:
    group = make_group(
        popularity, 9, 32, widths, torch.float32, seed=7, base_rows=2, empty_segments=1
    )
    a_ptrs, b_ptrs, ranks, scales = group_tables(group)
    x, seg, r = group[0].x, group[0].seg_starts, group[0].r_max
    v = torch.full((x.shape[0], len(group) * r), float("nan"))
    sgmv_shrink(v, x, a_ptrs, seg, ranks, 1)
    for i, p in enumerate(group):
        check_shrink(v[:, i * r : (i + 1) * r], naive_shrink(p, 1), torch.float32)
    v_in, y0 = group_expand_input(group, seed=3)
    y = y0.clone()
    sgmv_expand(y, v_in, b_ptrs, seg, ranks, scales, 1, widths)
    cols = 0
    for i, p in enumerate(group):
        ref = naive_expand(p, y0[:, cols : cols + p.h_out], v_in[:, i * r : (i + 1) * r], 1)
        assert rel_err(y[:, cols : cols + p.h_out], ref) < TOL[torch.float32]
        cols += p.h_out


def test_reference_group_overwrite_writes_the_lora_term_alone() -> None:
    group = make_group("skewed", 9, 32, (24, 8, 8), torch.float32, seed=5, base_rows=2)
    _, b_ptrs, ranks, scales = group_tables(group)
    widths = tuple(p.h_out for p in group)
    v, y0 = group_expand_input(group, seed=4)
    expected = torch.zeros_like(y0)
    sgmv_expand(expected, v, b_ptrs, group[0].seg_starts, ranks, scales, 1, widths)
    y = torch.full_like(y0, float("nan"))
    sgmv_expand(y, v, b_ptrs, group[0].seg_starts, ranks, scales, 1, widths, accumulate=False)
    assert torch.equal(y, expected)
    assert (y[:2] == 0).all()  # the base rows' rank-0 segment is written as zeros
    assert (y[2:] != 0).any()


def test_lora_batch_rejects_segments_not_covering_row_0() -> None:
    with pytest.raises(ValueError, match="start at row 0"):
        build_lora_batch([2], [None], 4, torch.float32, torch.device("cpu"))


def test_reference_group_rejects_bad_widths() -> None:
    group = make_group("uniform", 4, 16, (8, 8), torch.float32, seed=1)
    _, b_ptrs, ranks, scales = group_tables(group)
    v, y = group_expand_input(group, seed=1)
    with pytest.raises(ValueError, match="do not sum"):
        sgmv_expand(y, v, b_ptrs, group[0].seg_starts, ranks, scales, 0, (8, 16))


def gpu_group_vs_reference(group: list[Problem], layer: int, seed: int) -> None:
    widths = tuple(p.h_out for p in group)
    a_ptrs, b_ptrs, ranks, scales = group_tables(group)
    x, seg, r = group[0].x, group[0].seg_starts, group[0].r_max
    dtype = x.dtype
    ref_v = torch.full((x.shape[0], len(group) * r), float("nan"), dtype=dtype)
    sgmv_shrink_reference(ref_v, x, a_ptrs, seg, ranks, layer)
    cuda_group = [p.to("cuda") for p in group]
    ca, cb, cr, cs = group_tables(cuda_group)
    cx, cseg = cuda_group[0].x, cuda_group[0].seg_starts
    v = torch.full_like(ref_v, float("nan")).cuda()  # poisoned
    sgmv_shrink(v, cx, ca, cseg, cr, layer)
    v = v.cpu()
    mask = ~ref_v.isnan()
    assert not v[mask].isnan().any(), "grouped shrink left an output element unwritten"
    assert rel_err(v[mask], ref_v[mask].double()) < TOL[dtype]
    assert v[~mask].isnan().all(), "grouped shrink wrote columns or rows it must leave untouched"

    v_in, y0 = group_expand_input(group, seed)
    ref_y = y0.clone()
    sgmv_expand_reference(ref_y, v_in, b_ptrs, seg, ranks, scales, layer, widths)
    y = y0.cuda()
    sgmv_expand(y, v_in.cuda(), cb, cseg, cr, cs, layer, widths)
    y = y.cpu()
    assert rel_err(y, ref_y.double()) < TOL[dtype]
    cols = 0
    for p in group:  # rows a projection skips keep their y exactly
        skipped = [t for s, lo, hi in p.segment_rows() if p.ranks[s] == 0 for t in range(lo, hi)]
        assert torch.equal(y[skipped, cols : cols + p.h_out], y0[skipped, cols : cols + p.h_out])
        cols += p.h_out

    # accumulate=False writes the LoRA term alone over a poisoned y: zeros where skipped.
    ref_delta = torch.zeros_like(y0)
    sgmv_expand_reference(ref_delta, v_in, b_ptrs, seg, ranks, scales, layer, widths)
    delta = torch.full_like(y0, float("nan")).cuda()
    sgmv_expand(delta, v_in.cuda(), cb, cseg, cr, cs, layer, widths, accumulate=False)
    delta = delta.cpu()
    assert not delta.isnan().any(), "overwriting expand left an output element unwritten"
    assert rel_err(delta, ref_delta.double()) < TOL[dtype]
    cols = 0
    for p in group:
        skipped = [t for s, lo, hi in p.segment_rows() if p.ranks[s] == 0 for t in range(lo, hi)]
        assert (delta[skipped, cols : cols + p.h_out] == 0).all()
        cols += p.h_out


@gpu
@needs_cuda
@pytest.mark.parametrize(
    ("h_in", "widths"),
    [
        (4096, (4096, 1024, 1024)),
        (4096, (11008, 11008)),
        (5120, (5120, 5120, 5120)),
        (8 * 37, (8 * 11, 8 * 129)),
    ],
)
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("rows", [1, 32, 64, 129])
def test_cuda_group_matches_reference(
    h_in: int, widths: tuple[int, ...], popularity: str, rows: int
) -> None:
    group = make_group(
        popularity,
        rows,
        h_in,
        widths,
        torch.bfloat16,
        seed=rows + h_in,
        base_rows=rows % 3,
        empty_segments=1,
    )
    gpu_group_vs_reference(group, layer=NUM_LAYERS - 1, seed=rows)


@gpu
@needs_cuda
@pytest.mark.parametrize("r_max", [16, 64])
def test_cuda_group_small_r_max_fp16(r_max: int) -> None:
    """Per-projection width r_max (the v buffer is [T, P * r_max]); float16."""
    group = make_group("uniform", 48, 4096, (4096, 1024, 1024), torch.float16, seed=r_max)
    for p in group:
        p.r_max = r_max
        for s, r in enumerate(p.ranks.tolist()):
            if r > r_max:  # this table would not fit: drop the segment's adapter
                p.ranks[s] = 0
                p.a_stacks[s] = p.b_stacks[s] = None
    gpu_group_vs_reference(group, layer=0, seed=r_max)


@gpu
@needs_cuda
def test_cuda_group_graph_replay_equals_eager() -> None:
    widths = (4096, 1024, 1024)
    group = [p.to("cuda") for p in make_group("skewed", 40, 4096, widths, torch.bfloat16, seed=5)]
    a_ptrs, b_ptrs, ranks, scales = group_tables(group)
    seg, r = group[0].seg_starts, group[0].r_max
    x = group[0].x.clone()
    v = torch.empty(x.shape[0], len(group) * r, dtype=x.dtype, device="cuda")
    y = torch.zeros(x.shape[0], sum(widths), dtype=x.dtype, device="cuda")

    def step() -> None:
        sgmv_shrink(v, x, a_ptrs, seg, ranks, 2)
        sgmv_expand(y, v, b_ptrs, seg, ranks, scales, 2, widths)

    assert replay_equals_eager(step, x, y).abs().sum() > 0


BAD_GROUP_CALLS = """
import torch
from shard.ops import sgmv_expand, sgmv_shrink
dev = "cuda"
seg = torch.tensor([0, 2, 4], dtype=torch.int32, device=dev)
ptrs = torch.zeros(2, 2, dtype=torch.int64, device=dev)
ranks = torch.full((2, 2), 8, dtype=torch.int32, device=dev)
scales = torch.ones(2, 2, device=dev)
x = torch.randn(4, 64, dtype=torch.bfloat16, device=dev)
v = torch.empty(4, 2 * 16, dtype=torch.bfloat16, device=dev)
y = torch.zeros(4, 128, dtype=torch.bfloat16, device=dev)
for call in (
    lambda: sgmv_shrink(v, x, ptrs, seg, ranks[:1], 0),
    lambda: sgmv_expand(y, v, ptrs, seg, ranks, scales, 0, (64, 72)),
):
    try:
        call()
        print("no error")
    except RuntimeError as e:
        print("raised:", str(e).splitlines()[0])
"""


@gpu
@needs_cuda
def test_cuda_group_rejects_bad_tables() -> None:
    """Bad [P, S] tables raise RuntimeError (in a subprocess: a crash must fail, not abort, the
    suite)."""
    out = subprocess.run(
        [sys.executable, "-c", BAD_GROUP_CALLS], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("raised", "no error"))]
    assert len(lines) == 2, out.stdout
    assert "ranks must have the shape of a_ptrs" in lines[0]
    assert "widths sum to 136 but y has 128 columns" in lines[1]
