"""sgmv_fused (one projection group's shrink + expand; one launch on sm_90 with
LORAFLEET_FUSED=1, two otherwise): the CPU reference against a float64 per-row oracle, the CUDA op
against the reference over popularity, odd sizes, mixed and zero ranks, every model width, a
poisoned scratch, and graph replay. benchmarks/run_sgmv_gpu.sh runs the GPU tests both ways."""

from __future__ import annotations

import pytest
import torch

from shard.ops.sgmv import sgmv_fused, sgmv_fused_reference
from tests.sgmv_problems import (
    NUM_LAYERS,
    POPULARITY,
    TOL,
    Problem,
    gpu,
    naive_expand,
    naive_shrink,
    needs_cuda,
    rel_err,
)
from tests.test_sgmv import WIDTHS
from tests.test_sgmv_groups import group_expand_input, group_tables, make_group

SMALL_RANKS = (4, 8, 16)  # r_max 16: the fused kernel's RMAX=16 instance
MID_RANKS = (8, 16, 32)  # r_max 32


@pytest.mark.parametrize("popularity", POPULARITY)
def test_reference_fused_matches_naive_loop(popularity: str) -> None:
    group = make_group(
        popularity, 9, 32, (24, 8, 16), torch.float32, seed=3, base_rows=2, empty_segments=1
    )
    a_ptrs, b_ptrs, ranks, scales = group_tables(group)
    x, seg, r = group[0].x, group[0].seg_starts, group[0].r_max
    y0 = group_expand_input(group, seed=3)[1]
    y = y0.clone()
    v = torch.empty(x.shape[0], len(group) * r)
    sgmv_fused(y, x, v, a_ptrs, b_ptrs, seg, ranks, scales, 1, [p.h_out for p in group])
    cols = 0
    for p in group:
        v_naive = naive_shrink(p, 1)
        ref = naive_expand(p, y0[:, cols : cols + p.h_out], v_naive, 1)
        assert rel_err(y[:, cols : cols + p.h_out], ref) < TOL[torch.float32]
        cols += p.h_out


def gpu_fused_vs_reference(group: list[Problem], layer: int, seed: int) -> None:
    """The CUDA op against the reference; its scratch v starts as NaN, which it may not leak."""
    widths = tuple(p.h_out for p in group)
    a_ptrs, b_ptrs, ranks, scales = group_tables(group)
    x, seg, r = group[0].x, group[0].seg_starts, group[0].r_max
    y0 = group_expand_input(group, seed)[1]
    ref_y = y0.clone()
    scratch = torch.empty(x.shape[0], len(group) * r, dtype=x.dtype)
    sgmv_fused_reference(ref_y, x, scratch, a_ptrs, b_ptrs, seg, ranks, scales, layer, widths)

    cuda_group = [p.to("cuda") for p in group]
    ca, cb, cr, cs = group_tables(cuda_group)
    v = torch.full(scratch.shape, float("nan"), dtype=x.dtype, device="cuda")
    y = y0.cuda()
    sgmv_fused(y, cuda_group[0].x, v, ca, cb, cuda_group[0].seg_starts, cr, cs, layer, widths)
    y = y.cpu()
    assert not y.isnan().any(), "a NaN leaked into y"
    assert rel_err(y, ref_y.double()) < TOL[x.dtype]
    cols = 0
    for p in group:  # rows a projection skips keep their y exactly
        skipped = [t for s, lo, hi in p.segment_rows() if p.ranks[s] == 0 for t in range(lo, hi)]
        assert torch.equal(y[skipped, cols : cols + p.h_out], y0[skipped, cols : cols + p.h_out])
        cols += p.h_out


@gpu
@needs_cuda
@pytest.mark.parametrize(
    ("h_in", "widths"),
    [
        (4096, (4096, 1024, 1024)),
        (4096, (11008, 11008)),
        (11008, (4096,)),
        (8 * 37, (8 * 11, 8 * 129)),
    ],
)
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("rows", [1, 3, 16, 33, 64, 129])
def test_cuda_fused_matches_reference(
    h_in: int, widths: tuple[int, ...], popularity: str, rows: int
) -> None:
    ranks = SMALL_RANKS if rows % 2 else MID_RANKS
    group = make_group(
        popularity,
        rows,
        h_in,
        widths,
        torch.bfloat16,
        seed=rows + h_in,
        base_rows=rows % 3,
        empty_segments=1,
        ranks=ranks,
    )
    gpu_fused_vs_reference(group, layer=NUM_LAYERS - 1, seed=rows)


@gpu
@needs_cuda
@pytest.mark.parametrize(("h_in", "h_out"), WIDTHS)
@pytest.mark.parametrize("rows", [1, 32])
def test_cuda_fused_all_widths(h_in: int, h_out: int, rows: int) -> None:
    group = make_group("distinct", rows, h_in, (h_out,), torch.bfloat16, seed=h_in, ranks=(16,))
    gpu_fused_vs_reference(group, layer=1, seed=rows)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [16, 64])
def test_cuda_fused_identical(dtype: torch.dtype, rows: int) -> None:
    group = make_group("identical", rows, 4096, (11008,), dtype, seed=rows, ranks=(16,))
    gpu_fused_vs_reference(group, layer=0, seed=rows)


@gpu
@needs_cuda
@pytest.mark.parametrize("ranks", [(4, 128), (64,)])
def test_cuda_fused_large_ranks_fall_back(ranks: tuple[int, ...]) -> None:
    """Ranks above 32 take the two launches through the same op."""
    group = make_group("skewed", 24, 4096, (4096, 1024), torch.bfloat16, seed=2, ranks=ranks)
    gpu_fused_vs_reference(group, layer=2, seed=2)


@gpu
@needs_cuda
def test_cuda_fused_graph_replay_equals_eager() -> None:
    """Bit for bit: the cluster sums its partials in a fixed order."""
    widths = (4096, 1024, 1024)
    group = make_group("distinct", 32, 4096, widths, torch.bfloat16, seed=5, ranks=MID_RANKS)
    group = [p.to("cuda") for p in group]
    a_ptrs, b_ptrs, ranks, scales = group_tables(group)
    seg, r = group[0].seg_starts, group[0].r_max
    x = group[0].x.clone()
    v = torch.empty(x.shape[0], len(group) * r, dtype=x.dtype, device="cuda")
    y = torch.zeros(x.shape[0], sum(widths), dtype=x.dtype, device="cuda")

    def step() -> None:
        sgmv_fused(y, x, v, a_ptrs, b_ptrs, seg, ranks, scales, 2, widths)

    step()  # warm-up (lazy build, cluster capacity query) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(torch.randn_like(x))
    y.zero_()
    graph.replay()
    replayed = y.clone()
    y.zero_()
    step()
    assert replayed.abs().sum() > 0
    torch.testing.assert_close(replayed, y, rtol=0, atol=0)
