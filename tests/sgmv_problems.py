"""Shared SGMV test problems: random adapters over segmented rows, a float64 per-row oracle,
and the tolerances the CUDA ops are held to (tests/test_sgmv.py, tests/test_sgmv_groups.py)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from shard.ops import sgmv_expand, sgmv_shrink, weight_ptrs

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


def random_stack(
    rank: int, width: int, dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor | None:
    """A random ``[NUM_LAYERS, rank, width]`` weight stack (None for rank 0: no adapter)."""
    if rank == 0:
        return None
    return (torch.randn(NUM_LAYERS, rank, width, generator=gen) / width**0.5).to(dtype)


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

    return Problem(
        x=torch.randn(starts[-1], h_in, generator=gen).to(dtype),
        a_stacks=[random_stack(r, h_in, dtype, gen) for r in seg_ranks],
        b_stacks=[random_stack(r, h_out, dtype, gen) for r in seg_ranks],
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


def replay_equals_eager(step: Callable[[], None], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Captures `step` (which reads x and accumulates into y) in a CUDA graph after one eager
    warm-up (the lazy build stays outside the capture), replays it on fresh x and checks that the
    same step run eagerly gives y bit for bit; returns the replayed y."""
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
    torch.testing.assert_close(replayed, y, rtol=0, atol=0)
    return replayed
