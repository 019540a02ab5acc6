"""Paged KV append and decode attention: the CPU reference against a float64 per-request loop
through F.scaled_dot_product_attention, the CUDA kernels against the reference (GPU tests are
marked ``gpu`` and skipped without CUDA)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shard.ops.attention import (
    HEAD_DIMS,
    MAX_GROUP,
    MAX_SPLITS,
    PAGE_SIZE,
    kv_append,
    kv_append_reference,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from shard.ops.build import ops

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONTEXTS = (1, 15, 16, 17, 1000, 4097)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


CSRC = Path(__file__).resolve().parents[1] / "csrc"


def test_the_python_limits_are_the_kernels() -> None:
    """What ops/attention.py sends to the kernel (page size, query heads per KV head, split
    count, head dims) is what csrc/paged_attention.h and ops.cpp serve."""
    header = (CSRC / "paged_attention.h").read_text()
    consts = {k: int(v) for k, v in re.findall(r"constexpr int (k\w+) = (\d+);", header)}
    assert (consts["kPageSize"], consts["kMaxGroup"], consts["kMaxSplits"]) == (
        PAGE_SIZE,
        MAX_GROUP,
        MAX_SPLITS,
    )
    ops_cpp = (CSRC / "ops.cpp").read_text()
    dispatch = re.search(r"dispatch_head_dim\(.*?\n\}", ops_cpp, re.S)
    assert dispatch, "csrc/ops.cpp: no dispatch_head_dim"
    served = sorted(int(d) for d in re.findall(r"paged_decode_attention<T, (\d+)>", dispatch[0]))
    assert tuple(served) == HEAD_DIMS


@dataclass
class Problem:
    """A decode batch over a paged cache whose unused slots hold NaN."""

    q: torch.Tensor  # [B, n_q, d]
    k_cache: torch.Tensor  # [pages, page_size, n_kv, d]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_pages] int32, garbage past each request's pages
    context_lens: torch.Tensor  # [B] int32
    scale: float

    def to(self, device: str) -> Problem:
        return Problem(
            self.q.to(device),
            self.k_cache.to(device),
            self.v_cache.to(device),
            self.block_tables.to(device),
            self.context_lens.to(device),
            self.scale,
        )

    def pages_of(self, b: int) -> list[int]:
        page_size = self.k_cache.shape[1]
        n = -(-int(self.context_lens[b]) // page_size)
        return self.block_tables[b, :n].tolist()


def make_problem(
    contexts: tuple[int, ...],
    n_q: int,
    n_kv: int,
    d: int,
    dtype: torch.dtype,
    seed: int,
    page_size: int = 16,
    spare_pages: int = 3,
) -> Problem:
    """Pages of all requests shuffled over the pool; table entries past a request's pages hold
    out-of-range garbage and every cache slot outside a context holds NaN."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-c // page_size) for c in contexts]
    total = sum(needed) + spare_pages
    order = torch.randperm(total, generator=gen).tolist()
    width = max(needed, default=0) + 2
    tables = torch.randint(10**6, 2 * 10**6, (len(contexts), width), generator=gen)
    k_cache = torch.full((total, page_size, n_kv, d), float("nan"))
    v_cache = torch.full((total, page_size, n_kv, d), float("nan"))
    for b, (ctx, n) in enumerate(zip(contexts, needed, strict=True)):
        pages, order = order[:n], order[n:]
        tables[b, :n] = torch.tensor(pages, dtype=torch.long)
        for i, page in enumerate(pages):
            used = min(page_size, ctx - i * page_size)
            k_cache[page, :used] = torch.randn(used, n_kv, d, generator=gen)
            v_cache[page, :used] = torch.randn(used, n_kv, d, generator=gen)
    return Problem(
        q=torch.randn(len(contexts), n_q, d, generator=gen).to(dtype),
        k_cache=k_cache.to(dtype),
        v_cache=v_cache.to(dtype),
        block_tables=tables.to(torch.int32),
        context_lens=torch.tensor(contexts, dtype=torch.int32),
        scale=d**-0.5,
    )


def naive_attention(p: Problem) -> torch.Tensor:
    """float64 [B, n_q, d]: one SDPA call per request over its gathered context."""
    batch, n_q, d = p.q.shape
    out = torch.zeros(batch, n_q, d, dtype=torch.float64)
    for b in range(batch):
        ctx = int(p.context_lens[b])
        if ctx == 0:
            continue
        pages = p.pages_of(b)
        keys = p.k_cache[pages].flatten(0, 1)[:ctx].double()  # [ctx, n_kv, d]
        values = p.v_cache[pages].flatten(0, 1)[:ctx].double()
        out[b] = F.scaled_dot_product_attention(
            p.q[b].double().unsqueeze(1),  # [n_q, 1, d]
            keys.transpose(0, 1),
            values.transpose(0, 1),
            scale=p.scale,
            enable_gqa=True,
        ).squeeze(1)
    return out


def reference(p: Problem) -> torch.Tensor:
    """The plain-torch path, accumulated and returned in float32."""
    out = torch.full(p.q.shape, float("nan"), dtype=torch.float32, device=p.q.device)
    paged_decode_attention_reference(
        out, p.q, p.k_cache, p.v_cache, p.block_tables, p.context_lens, p.scale
    )
    return out


def assert_close_per_request(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Relative error of every request on its own, so one wrong request cannot hide."""
    assert not out.isnan().any(), "an output element was not written (or is NaN)"
    for b in range(out.shape[0]):
        num = (out[b].double().cpu() - ref[b].double().cpu()).norm()
        den = ref[b].double().cpu().norm().clamp_min(1e-30)
        assert (num / den).item() < tol, f"request {b}: relative error {(num / den).item():.2e}"


# ---------------------------------------------------------------- CPU: reference semantics


@pytest.mark.parametrize(("n_q", "n_kv"), [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_sdpa_loop(n_q: int, n_kv: int, dtype: torch.dtype) -> None:
    p = make_problem((1, 15, 16, 17, 70), n_q, n_kv, 32, dtype, seed=n_q * 10 + n_kv)
    ref = naive_attention(p)
    assert_close_per_request(reference(p), ref, TOL[torch.float32])
    out = torch.full_like(p.q, float("nan"))
    paged_decode_attention(out, p.q, p.k_cache, p.v_cache, p.block_tables, p.context_lens, p.scale)
    assert_close_per_request(out, ref, TOL[dtype])


def test_reference_page_size_8_and_odd_head_dim() -> None:
    p = make_problem((3, 8, 9, 40), 6, 3, 24, torch.float32, seed=2, page_size=8)
    assert_close_per_request(reference(p), naive_attention(p), TOL[torch.float32])


def test_reference_empty_context_gives_zeros() -> None:
    p = make_problem((0, 5, 0), 4, 2, 16, torch.float32, seed=3)
    out = reference(p)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert_close_per_request(out[1:2], naive_attention(p)[1:2], TOL[torch.float32])


def test_reference_gqa_maps_head_to_its_kv_group() -> None:
    """Query heads 0..3 read kv head 0 and 4..7 kv head 1: equal queries, different results."""
    p = make_problem((20,), 8, 2, 16, torch.float32, seed=4)
    p.q[0, :] = p.q[0, 0]
    out = reference(p)
    torch.testing.assert_close(out[0, 3], out[0, 0])
    torch.testing.assert_close(out[0, 7], out[0, 4])
    assert not torch.allclose(out[0, 0], out[0, 4])


def fused_kv(rows: int, n_q: int, n_kv: int, d: int, dtype: torch.dtype, device: str):
    """k, v [rows, n_kv, d] as column slices of one fused qkv output (row stride != n_kv * d)."""
    qkv = torch.randn(rows, (n_q + 2 * n_kv) * d, device=device).to(dtype)
    heads = qkv.view(rows, n_q + 2 * n_kv, d)
    return heads[:, n_q : n_q + n_kv], heads[:, n_q + n_kv :]


def check_append(append, device: str, dtype: torch.dtype) -> None:
    pages, page_size, n_kv, d = 6, 16, 2, 64
    k_cache = torch.randn(pages, page_size, n_kv, d, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    k, v = fused_kv(7, 8, n_kv, d, dtype, device)
    assert not k.is_contiguous()
    slots = torch.tensor([17, 3, 0, 95, 64, 40, 41], dtype=torch.int64, device=device)
    expect_k, expect_v = k_cache.clone().view(-1, n_kv, d), v_cache.clone().view(-1, n_kv, d)
    for t, slot in enumerate(slots.tolist()):
        expect_k[slot], expect_v[slot] = k[t], v[t]
    append(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache.view(-1, n_kv, d), expect_k)
    assert torch.equal(v_cache.view(-1, n_kv, d), expect_v)


@pytest.mark.parametrize("append", [kv_append, kv_append_reference])
def test_append_writes_each_row_to_its_slot(append) -> None:
    check_append(append, "cpu", torch.float32)


# ---------------------------------------------------------------- GPU: kernels vs reference


def run_kernel(p: Problem, max_splits: int = 8) -> torch.Tensor:
    out = torch.full_like(p.q, float("nan"))
    paged_decode_attention(
        out,
        p.q,
        p.k_cache,
        p.v_cache,
        p.block_tables,
        p.context_lens,
        p.scale,
        max_splits=max_splits,
    )
    return out


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("max_splits", [1, 8])
def test_cuda_matches_reference(dtype: torch.dtype, d: int, group: int, max_splits: int) -> None:
    n_kv = 4
    p = make_problem(CONTEXTS, group * n_kv, n_kv, d, dtype, seed=d + group).to("cuda")
    assert_close_per_request(run_kernel(p, max_splits), reference(p), TOL[dtype])


@gpu
@needs_cuda
@pytest.mark.parametrize("max_splits", [1, 2, 8])
def test_cuda_long_context_small_batch(max_splits: int) -> None:
    p = make_problem((32768, 3), 32, 8, 128, torch.bfloat16, seed=7).to("cuda")
    assert_close_per_request(run_kernel(p, max_splits), reference(p), TOL[torch.bfloat16])


@gpu
@needs_cuda
def test_cuda_odd_group_and_batch() -> None:
    """7 query heads per kv head (Qwen-like), 37 requests of random lengths, padded rows."""
    gen = torch.Generator().manual_seed(5)
    contexts = (*torch.randint(0, 3000, (37,), generator=gen).tolist(), 0)
    p = make_problem(contexts, 28, 4, 128, torch.float16, seed=5).to("cuda")
    out = run_kernel(p)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert_close_per_request(out, reference(p), TOL[torch.float16])


@gpu
@needs_cuda
def test_cuda_strided_q_and_out() -> None:
    """q and out as column slices of wider tensors; columns beside them stay untouched."""
    p = make_problem((100, 16, 700), 16, 4, 128, torch.bfloat16, seed=6).to("cuda")
    wide_q = torch.randn(3, 24, 128, device="cuda").to(torch.bfloat16)
    wide_q[:, 4:20] = p.q
    wide_out = torch.randn(3, 20, 128, device="cuda").to(torch.bfloat16)
    before = wide_out.clone()
    q, out = wide_q[:, 4:20], wide_out[:, 2:18]
    paged_decode_attention(out, q, p.k_cache, p.v_cache, p.block_tables, p.context_lens, p.scale)
    assert_close_per_request(out, reference(p), TOL[torch.bfloat16])
    assert torch.equal(wide_out[:, :2], before[:, :2])
    assert torch.equal(wide_out[:, 18:], before[:, 18:])


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_append_matches_reference(dtype: torch.dtype) -> None:
    check_append(kv_append, "cuda", dtype)


@gpu
@needs_cuda
def test_cuda_graph_replay_equals_eager() -> None:
    """One decode step (append + attention) captured once, replayed on new inputs."""
    contexts = (5, 300, 17, 2000)
    p = make_problem(contexts, 32, 8, 128, torch.bfloat16, seed=8).to("cuda")
    k_new, v_new = fused_kv(4, 32, 8, 128, torch.bfloat16, "cuda")
    slots = torch.tensor([0, 1, 3, 2], dtype=torch.int64, device="cuda")
    slots += p.block_tables[:, 0].long() * 16
    out = torch.full_like(p.q, float("nan"))

    def step() -> None:
        kv_append(p.k_cache, p.v_cache, k_new, v_new, slots)
        paged_decode_attention(
            out, p.q, p.k_cache, p.v_cache, p.block_tables, p.context_lens, p.scale
        )

    step()  # warm-up (and the lazy build) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    k_cache0, v_cache0 = p.k_cache.clone(), p.v_cache.clone()
    p.q.copy_(torch.randn_like(p.q))
    k_new.copy_(torch.randn_like(k_new))
    p.context_lens.copy_(torch.tensor([5, 1, 16, 1999], dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    replayed, k_replayed = out.clone(), p.k_cache.clone()
    p.k_cache.copy_(k_cache0)
    p.v_cache.copy_(v_cache0)
    out.fill_(float("nan"))
    step()
    assert torch.equal(replayed, out)
    assert torch.equal(k_replayed.nan_to_num(), p.k_cache.nan_to_num())
    assert_close_per_request(out, reference(p), TOL[torch.bfloat16])


@gpu
@needs_cuda
def test_cuda_unsupported_shapes() -> None:
    """The op names what it lacks; the facade sends such shapes to the reference instead."""
    lorafleet = ops()
    p = make_problem((20, 3), 8, 2, 80, torch.bfloat16, seed=9).to("cuda")
    out = torch.empty_like(p.q)
    args = (out, p.q, p.k_cache, p.v_cache, p.block_tables, p.context_lens, p.scale)
    with pytest.raises(RuntimeError, match="no kernel for dtype=BFloat16, head_dim=80"):
        lorafleet.paged_decode_attention(*args)
    paged_decode_attention(*args)
    assert_close_per_request(out, reference(p), TOL[torch.bfloat16])
    p = make_problem((20,), 16, 1, 64, torch.bfloat16, seed=9).to("cuda")
    with pytest.raises(RuntimeError, match="n_q/n_kv=16"):
        lorafleet.paged_decode_attention(
            torch.empty_like(p.q), p.q, p.k_cache, p.v_cache, p.block_tables, p.context_lens, 1.0
        )
    k = torch.zeros(3, 2, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        lorafleet.kv_append(
            p.k_cache, p.v_cache, k, k, torch.zeros(3, dtype=torch.int64, device="cuda")
        )
