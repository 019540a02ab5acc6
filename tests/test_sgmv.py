"""SGMV shrink/expand: the CPU reference against a float64 per-row loop, the CUDA ops against
the reference (GPU tests are marked ``gpu`` and skipped without CUDA)."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from shard.ops import sgmv_expand, sgmv_shrink, weight_ptrs
from shard.ops.sgmv import sgmv_expand_reference, sgmv_shrink_reference

POPULARITY = ("distinct", "uniform", "skewed", "identical")
RANKS = (4, 8, 16, 32, 64, 128)
NUM_LAYERS = 3
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@dataclass
class Problem:
    """One batch: rows grouped by adapter into segments, plus per-adapter weight stacks."""

    x: torch.Tensor  # [T, h_in]
    a_stacks: list[torch.Tensor | None]  # per segment [L, r_s, h_in] (None: base rows)
    b_stacks: list[torch.Tensor | None]  # per segment [L, r_s, h_out]
    seg_starts: torch.Tensor  # [S + 1] int32
    ranks: torch.Tensor  # [S] int32
    scales: torch.Tensor  # [S] float32
    r_max: int
    h_out: int

    def to(self, device: str) -> Problem:
        def move(ws: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
            return [None if w is None else w.to(device) for w in ws]

        return Problem(
            self.x.to(device),
            move(self.a_stacks),
            move(self.b_stacks),
            self.seg_starts.to(device),
            self.ranks.to(device),
            self.scales.to(device),
            self.r_max,
            self.h_out,
        )

    def a_ptrs(self) -> torch.Tensor:
        return weight_ptrs(self.a_stacks, self.x.device)

    def b_ptrs(self) -> torch.Tensor:
        return weight_ptrs(self.b_stacks, self.x.device)

    def segment_rows(self) -> list[tuple[int, int, int]]:
        """(segment, first row, end row) of every segment."""
        starts = self.seg_starts.tolist()
        return [(s, starts[s], starts[s + 1]) for s in range(len(starts) - 1)]


def adapter_of_rows(popularity: str, rows: int, adapters: int, rng: random.Random) -> list[int]:
    """Adapter index of each row, sorted, under one popularity distribution."""
    if popularity == "distinct":
        picks = list(range(rows))
    elif popularity == "uniform":
        picks = [rng.randrange(adapters) for _ in range(rows)]
    elif popularity == "skewed":
        weights = [1.0 / (i + 1) ** 1.5 for i in range(adapters)]  # Zipf 1.5
        picks = rng.choices(range(adapters), weights=weights, k=rows)
    else:
        picks = [0] * rows
    return sorted(picks)


def make_problem(
    popularity: str,
    rows: int,
    h_in: int,
    h_out: int,
    dtype: torch.dtype,
    seed: int,
    ranks: tuple[int, ...] = RANKS,
    base_rows: int = 0,
    empty_segments: int = 0,
) -> Problem:
    """A fresh random batch; ``base_rows`` rows with no adapter come first as a rank-0 segment,
    ``empty_segments`` adapters with no rows are spliced between the others."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    adapters = max(rows, 1) if popularity == "distinct" else 5
    picks = adapter_of_rows(popularity, rows, adapters, rng)
    counts = [picks.count(i) for i in sorted(set(picks))]
    for _ in range(empty_segments):
        counts.insert(rng.randrange(len(counts) + 1), 0)
    seg_ranks = [rng.choice(ranks) for _ in counts]
    if base_rows:
        counts.insert(0, base_rows)
        seg_ranks.insert(0, 0)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)

    def stack(rank: int, width: int) -> torch.Tensor | None:
        if rank == 0:
            return None
        return (torch.randn(NUM_LAYERS, rank, width, generator=gen) / width**0.5).to(dtype)

    return Problem(
        x=torch.randn(starts[-1], h_in, generator=gen).to(dtype),
        a_stacks=[stack(r, h_in) for r in seg_ranks],
        b_stacks=[stack(r, h_out) for r in seg_ranks],
        seg_starts=torch.tensor(starts, dtype=torch.int32),
        ranks=torch.tensor(seg_ranks, dtype=torch.int32),
        scales=torch.rand(len(counts), generator=gen) + 0.5,
        r_max=max(ranks),
        h_out=h_out,
    )


def naive_shrink(p: Problem, layer: int) -> torch.Tensor:
    """float64 ``[T, r_max]`` per-row loop; NaN where the op leaves v untouched or don't-care."""
    v = torch.full((p.x.shape[0], p.r_max), float("nan"), dtype=torch.float64)
    for s, lo, hi in p.segment_rows():
        a = p.a_stacks[s]
        for t in range(lo, hi):
            if a is not None:
                v[t, : a.shape[1]] = a[layer].double() @ p.x[t].double()
    return v


def naive_expand(p: Problem, y0: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """float64 ``y0 + scale * v @ B`` per row."""
    y = y0.double().clone()
    for s, lo, hi in p.segment_rows():
        b = p.b_stacks[s]
        for t in range(lo, hi):
            if b is not None:
                r = b.shape[1]
                y[t] += p.scales[s].item() * (v[t, :r].double() @ b[layer].double())
    return y


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def check_shrink(v: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    mask = ~ref.isnan()
    assert not v.float()[mask].isnan().any(), "an output element was not written"
    assert rel_err(v.cpu()[mask], ref[mask]) < TOL[dtype]


def run_shrink(p: Problem, layer: int, poison: float = float("nan")) -> torch.Tensor:
    v = torch.full((p.x.shape[0], p.r_max), poison, dtype=p.x.dtype, device=p.x.device)
    sgmv_shrink(v, p.x, p.a_ptrs(), p.seg_starts, p.ranks, layer)
    return v


def run_expand(p: Problem, v: torch.Tensor, y: torch.Tensor, layer: int) -> torch.Tensor:
    sgmv_expand(y, v, p.b_ptrs(), p.seg_starts, p.ranks, p.scales, layer)
    return y


def expand_input(p: Problem, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random v (NaN in don't-care columns) and a random y to add into."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(p.x.shape[0], p.r_max, generator=gen)
    for s, lo, hi in p.segment_rows():
        v[lo:hi, int(p.ranks[s]) :] = float("nan")
    y = torch.randn(p.x.shape[0], p.h_out, generator=gen)
    return v.to(p.x.dtype), y.to(p.x.dtype)


# ---------------------------------------------------------------- CPU: reference vs naive loop


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

    step()  # warm-up (and the lazy build) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(torch.randn_like(x))
    y.zero_()
    graph.replay()
    replayed = y.clone()
    y.zero_()
    step()
    torch.testing.assert_close(replayed, y, rtol=0, atol=0)


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


# ---------------------------------------------------------------- projection groups ([P, S] tables)


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

        def stack(rank: int, w: int) -> torch.Tensor | None:
            if rank == 0:
                return None
            return (torch.randn(NUM_LAYERS, rank, w, generator=gen) / w**0.5).to(dtype)

        group.append(
            Problem(
                x=first.x,
                a_stacks=[stack(r, h_in) for r in ranks],
                b_stacks=[stack(r, width) for r in ranks],
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

    step()
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
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    assert "ranks must have the shape of a_ptrs" in lines[0]
    assert "widths sum to 136 but y has 128 columns" in lines[1]
