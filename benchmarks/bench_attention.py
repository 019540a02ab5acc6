"""Paged decode attention on one CUDA GPU: our kernel (with and without split-K) against the
plain-torch path and torch SDPA over the gathered KV (gather timed, and SDPA alone on KV that is
already contiguous).

Every request of a case has the same context; its pages are scattered at random over the pool.
Each method runs inside a CUDA graph, timed with CUDA events over replays; a graph holds one
call per input set, and the sets together span >= 3x the L2 cache, so every call reads its KV
from device memory. The floor of a case is its KV bytes (keys + values of every context token)
over the device-to-device copy bandwidth measured first (bytes read + written).

    python -m benchmarks.bench_attention --out benchmarks/results/attention_<device>.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from benchmarks.timing import copy_bandwidth, provenance, time_graph
from shard.ops.attention import PAGE_SIZE, paged_decode_attention, paged_decode_attention_reference

DTYPE = torch.bfloat16
SHAPES = (("llama7b", 32, 32, 128), ("gqa-32q8kv", 32, 8, 128))  # (name, n_q, n_kv, d)
BATCHES = (1, 8, 32, 64)
CONTEXTS = (512, 2048, 8192)


@dataclass(frozen=True, slots=True)
class Result:
    shape: str
    n_q: int
    n_kv: int
    head_dim: int
    batch: int
    context: int
    kv_bytes: int  # keys + values read by one call
    floor_us: float
    ours_us: float
    ours_no_split_us: float
    torch_us: float | None  # the plain-torch reference path (gather, float32 einsum, softmax)
    sdpa_gather_us: float | None  # gather the pages, then F.scaled_dot_product_attention
    sdpa_us: float | None  # SDPA alone, KV already contiguous (None: baselines not run)


class Case:
    """Input sets over one page pool; each set is a full decode batch."""

    def __init__(self, n_q: int, n_kv: int, d: int, batch: int, context: int) -> None:
        self.n_q, self.n_kv, self.d, self.batch, self.context = n_q, n_kv, d, batch, context
        self.kv_bytes = 2 * batch * context * n_kv * d * DTYPE.itemsize
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        self.sets = min(64, max(1, math.ceil(3 * l2 / self.kv_bytes)))
        pages_per_req = -(-context // PAGE_SIZE)
        pool = self.sets * batch * pages_per_req
        shape = (pool, PAGE_SIZE, n_kv, d)
        self.k_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
        self.v_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
        perm = torch.randperm(pool, device="cuda").to(torch.int32)
        self.tables = perm.view(self.sets, batch, pages_per_req)  # [sets, B, pages]
        self.lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self.q = torch.randn(self.sets, batch, n_q, d, device="cuda", dtype=DTYPE)
        self.out = torch.empty_like(self.q)
        self.scale = d**-0.5

    def per_set(self, op: Callable[..., None], **kwargs: int) -> list[Callable[[], None]]:
        """One call of ``op`` (a paged_decode_attention signature) per input set."""

        def call(s: int) -> None:
            op(
                self.out[s],
                self.q[s],
                self.k_cache,
                self.v_cache,
                self.tables[s],
                self.lens,
                self.scale,
                **kwargs,
            )

        return [lambda s=s: call(s) for s in range(self.sets)]

    def ours(self, max_splits: int) -> list[Callable[[], None]]:
        return self.per_set(paged_decode_attention, max_splits=max_splits)

    def reference(self) -> list[Callable[[], None]]:
        return self.per_set(paged_decode_attention_reference)

    def gathered(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, n_kv, S, d] keys and values of set s, gathered from their pages."""
        rows = self.batch, -1, self.n_kv, self.d
        pages = self.tables[s].long()
        keys = self.k_cache[pages].view(rows)[:, : self.context].transpose(1, 2)
        values = self.v_cache[pages].view(rows)[:, : self.context].transpose(1, 2)
        return keys, values

    def sdpa(self, s: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        q = self.q[s].view(self.batch, self.n_q, 1, self.d)
        attn = F.scaled_dot_product_attention(q, keys, values, scale=self.scale, enable_gqa=True)
        self.out[s].copy_(attn.view(self.batch, self.n_q, self.d))

    def sdpa_gather(self) -> list[Callable[[], None]]:
        return [lambda s=s: self.sdpa(s, *self.gathered(s)) for s in range(self.sets)]

    def sdpa_contiguous(self) -> list[Callable[[], None]]:
        kv = [tuple(t.contiguous() for t in self.gathered(s)) for s in range(self.sets)]
        return [lambda s=s: self.sdpa(s, *kv[s]) for s in range(self.sets)]


def run_case(
    name: str, n_q: int, n_kv: int, d: int, batch: int, context: int, bw: float, baselines: bool
) -> Result:
    case = Case(n_q, n_kv, d, batch, context)
    times: dict[str, float | None] = {
        "ours": time_graph(case.ours(8), reps=10),
        "ours_no_split": time_graph(case.ours(1), reps=10),
        "torch": time_graph(case.reference(), reps=3) if baselines else None,
        "sdpa_gather": time_graph(case.sdpa_gather(), reps=3) if baselines else None,
        "sdpa": time_graph(case.sdpa_contiguous(), reps=5) if baselines else None,
    }
    kv_bytes = case.kv_bytes
    del case
    torch.cuda.empty_cache()
    return Result(
        shape=name,
        n_q=n_q,
        n_kv=n_kv,
        head_dim=d,
        batch=batch,
        context=context,
        kv_bytes=kv_bytes,
        floor_us=kv_bytes / bw * 1e6,
        ours_us=times["ours"],
        ours_no_split_us=times["ours_no_split"],
        torch_us=times["torch"],
        sdpa_gather_us=times["sdpa_gather"],
        sdpa_us=times["sdpa"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--commit", default=None, help="git commit measured (default: HEAD)")
    parser.add_argument(
        "--command", default="python -m benchmarks.bench_attention", help="recorded"
    )
    parser.add_argument("--ours-only", action="store_true", help="skip the torch baselines")
    args = parser.parse_args()

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    results: list[Result] = []
    for name, n_q, n_kv, d in SHAPES:
        for batch in BATCHES:
            for context in CONTEXTS:
                results.append(run_case(name, n_q, n_kv, d, batch, context, bw, not args.ours_only))
                r = results[-1]
                print(f"{name} B={batch} ctx={context}: ours {r.ours_us:.1f} us", flush=True)
                write_report(args, bw, results)  # so far: a run cut short still leaves data

    print(
        f"{'shape':11} {'B':>3} {'ctx':>5} {'MB':>7} {'floor':>7} {'ours':>7} {'nosplit':>7} "
        f"{'TB/s':>5} {'%copy':>5} {'torch':>8} {'sdpa+g':>8} {'sdpa':>7}  (us)"
    )
    for r in results:
        tbps = r.kv_bytes / r.ours_us / 1e6
        pct = 100 * r.floor_us / r.ours_us
        print(
            f"{r.shape:11} {r.batch:3d} {r.context:5d} {r.kv_bytes / 1e6:7.1f} {r.floor_us:7.1f} "
            f"{r.ours_us:7.1f} {r.ours_no_split_us:7.1f} {tbps:5.2f} {pct:5.0f} "
            f"{r.torch_us or math.nan:8.1f} {r.sdpa_gather_us or math.nan:8.1f} "
            f"{r.sdpa_us or math.nan:7.1f}"
        )


def write_report(args: argparse.Namespace, bw: float, results: list[Result]) -> None:
    report = provenance(args.command, args.commit, bw) | {
        "dtype": str(DTYPE),
        "page_size": PAGE_SIZE,
        "l2_bytes": torch.cuda.get_device_properties(0).L2_cache_size,
        "cases": [asdict(r) | {"ours_tbps": r.kv_bytes / r.ours_us / 1e6} for r in results],
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
