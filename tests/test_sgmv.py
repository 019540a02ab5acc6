"""SGMV shrink/expand: the CPU reference against a float64 per-row loop, the CUDA ops against
the reference (GPU tests are marked ``gpu`` and skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from shard.ops import sgmv_expand, sgmv_shrink, weight_ptrs
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
    rel_err,
    replay_equals_eager,
    run_expand,
    run_shrink,
)


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_reference_matches_naive_loop(popularity: str, dtype: torch.dtype, rows: int) -> None:
    p = make_problem(popularity, rows, 40, 24, dtype, seed=rows, base_rows=2, empty_segments=2)
    layer = 1
    check_shrink(run_shrink(p, layer), naive_shrink(p, layer), dtype)
    v, y0 = expand_input(p, seed=rows)
    y = run_expand(p, v, y0.clone(), layer)
    ref = naive_expand(p, y0, v, layer)
    assert rel_err(y, ref) < TOL[dtype]
    torch.testing.assert_close(y[:2], y0[:2], rtol=0, atol=0)  # base rows untouched


def test_reference_leaves_rank0_rows_of_v_untouched() -> None:
    p = make_problem("uniform", 9, 16, 8, torch.float32, seed=3, base_rows=3)
    v = run_shrink(p, 0, poison=7.0)
    assert (v[:3] == 7.0).all()


def test_reference_single_segment_odd_sizes() -> None:
    p = make_problem("identical", 13, 8 * 37, 8 * 11, torch.float32, seed=5, ranks=(4,))
    check_shrink(run_shrink(p, 2), naive_shrink(p, 2), torch.float32)


def test_weight_ptrs_rejects_non_contiguous() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        weight_ptrs([torch.zeros(2, 4, 8).transpose(1, 2)], "cpu")


def test_reference_rejects_rank_above_r_max() -> None:
    p = make_problem("identical", 2, 16, 8, torch.float32, seed=1, ranks=(8,))
    v = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="r_max"):
        sgmv_shrink_reference(v, p.x, p.a_ptrs(), p.seg_starts, p.ranks, 0)


# ---------------------------------------------------------------- GPU: CUDA op vs reference

WIDTHS = [
    (4096, 11008),
    (11008, 4096),
    (4096, 1024),
    (5120, 13824),
    (13824, 5120),
    (8192, 28672),
    (28672, 8192),
    (4096, 14336),
    (14336, 4096),
    (8 * 37, 8 * 129),  # odd multiples of 8
]


def gpu_vs_reference(p_cpu: Problem, layer: int, seed: int) -> None:
    p = p_cpu.to("cuda")
    dtype = p.x.dtype
    ref_v = torch.full((p.x.shape[0], p.r_max), float("nan"), dtype=dtype)
    sgmv_shrink_reference(ref_v, p_cpu.x, p_cpu.a_ptrs(), p_cpu.seg_starts, p_cpu.ranks, layer)
    v = run_shrink(p, layer).cpu()
    mask = ~ref_v.isnan()
    assert not v[mask].isnan().any(), "shrink left an output element unwritten"
    assert rel_err(v[mask], ref_v[mask].double()) < TOL[dtype]
    assert v[~mask].isnan().all(), "shrink wrote rows it must leave untouched"

    v_in, y0 = expand_input(p_cpu, seed)
    ref_y = y0.clone()
    args = (p_cpu.b_ptrs(), p_cpu.seg_starts, p_cpu.ranks, p_cpu.scales, layer)
    sgmv_expand_reference(ref_y, v_in, *args)
    y = run_expand(p, v_in.cuda(), y0.cuda(), layer).cpu()
    assert rel_err(y, ref_y.double()) < TOL[dtype]
    untouched = [
        t for s, lo, hi in p_cpu.segment_rows() if p_cpu.ranks[s] == 0 for t in range(lo, hi)
    ]
    assert torch.equal(y[untouched], y0[untouched])

    # accumulate=False: the LoRA term alone over a poisoned y, zeros in rank-0 segments.
    ref_delta = torch.zeros_like(y0)
    sgmv_expand_reference(ref_delta, v_in, *args)
    delta = torch.full_like(y0, float("nan")).cuda()
    sgmv_expand(
        delta, v_in.cuda(), p.b_ptrs(), p.seg_starts, p.ranks, p.scales, layer, accumulate=False
    )
    delta = delta.cpu()
    assert not delta.isnan().any(), "overwriting expand left an output element unwritten"
    assert rel_err(delta, ref_delta.double()) < TOL[dtype]
    assert (delta[untouched] == 0).all()


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("rows", [1, 3, 32, 64, 129])
def test_cuda_matches_reference(dtype: torch.dtype, popularity: str, rows: int) -> None:
    h_in, h_out = WIDTHS[rows % len(WIDTHS)]
    p = make_problem(
        popularity, rows, h_in, h_out, dtype, seed=rows, base_rows=rows % 3, empty_segments=1
    )
    gpu_vs_reference(p, layer=NUM_LAYERS - 1, seed=rows)


@gpu
@needs_cuda
@pytest.mark.parametrize(("h_in", "h_out"), WIDTHS)
@pytest.mark.parametrize("rank", [4, 16, 128])
def test_cuda_all_widths(h_in: int, h_out: int, rank: int) -> None:
    p = make_problem("uniform", 11, h_in, h_out, torch.bfloat16, seed=h_in + rank, ranks=(rank,))
    gpu_vs_reference(p, layer=1, seed=rank)


@gpu
@needs_cuda
@pytest.mark.parametrize("r_max", [8, 16, 32, 64])
def test_cuda_small_r_max(r_max: int) -> None:
    ranks = tuple(r for r in RANKS if r <= r_max)
    p = make_problem("skewed", 45, 4096, 4096, torch.bfloat16, seed=r_max, ranks=ranks)
    gpu_vs_reference(p, layer=0, seed=r_max)


@gpu
@needs_cuda
def test_cuda_prefill_and_decode_mix() -> None:
    p = make_problem(
        "skewed", 700, 4096, 1024, torch.bfloat16, seed=11, base_rows=5, empty_segments=3
    )
    gpu_vs_reference(p, layer=2, seed=11)


@gpu
@needs_cuda
@pytest.mark.parametrize("popularity", ["identical", "uniform"])
def test_cuda_long_prefill(popularity: str) -> None:
    """Enough rows for the 64-row tiles (one per SM at least)."""
    p = make_problem(popularity, 9000, 1024, 1024, torch.float16, seed=12, ranks=(16, 64))
    gpu_vs_reference(p, layer=1, seed=12)


@gpu
@needs_cuda
def test_cuda_expand_into_column_slice() -> None:
    p = make_problem("uniform", 17, 1024, 512, torch.bfloat16, seed=4).to("cuda")
    v = expand_input(p, seed=4)[0].cuda()
    wide = torch.randn(17, 3 * 512, device="cuda").to(torch.bfloat16)  # [T, q | k | v]
    expect_slice = run_expand(p, v, wide[:, 512:1024].clone(), 1)
    before = wide.clone()
    run_expand(p, v, wide[:, 512:1024], 1)
    torch.testing.assert_close(wide[:, 512:1024], expect_slice, rtol=0, atol=0)
    torch.testing.assert_close(wide[:, :512], before[:, :512], rtol=0, atol=0)
    torch.testing.assert_close(wide[:, 1024:], before[:, 1024:], rtol=0, atol=0)


@gpu
@needs_cuda
def test_cuda_graph_replay_equals_eager() -> None:
    p = make_problem("uniform", 33, 4096, 11008, torch.bfloat16, seed=9, base_rows=2).to("cuda")
    a_ptrs, b_ptrs = p.a_ptrs(), p.b_ptrs()
    v = torch.empty(p.x.shape[0], p.r_max, dtype=p.x.dtype, device="cuda")
    y = torch.zeros(p.x.shape[0], p.h_out, dtype=p.x.dtype, device="cuda")
    x = p.x.clone()

    def step() -> None:
        sgmv_shrink(v, x, a_ptrs, p.seg_starts, p.ranks, 1)
        sgmv_expand(y, v, b_ptrs, p.seg_starts, p.ranks, p.scales, 1)

    replay_equals_eager(step, x, y)


@gpu
@needs_cuda
def test_cuda_rejects_unsupported() -> None:
    p = make_problem("identical", 4, 64, 64, torch.bfloat16, seed=2, ranks=(8,)).to("cuda")
    v = torch.empty(4, 256, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="no kernel for dtype"):
        sgmv_shrink(v, p.x, p.a_ptrs(), p.seg_starts, p.ranks, 0)
    v = torch.empty(4, 8, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="no kernel for dtype"):
        sgmv_shrink(v, p.x.float(), p.a_ptrs(), p.seg_starts, p.ranks, 0)
