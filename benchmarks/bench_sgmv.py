"""SGMV kernels against torch gather+bmm and a per-adapter loop, on one CUDA GPU.

Every method runs inside a CUDA graph and is timed with CUDA events over graph replays; each
call in the graph uses its own set of inputs and weights, and the sets together span >= 3x the
L2 cache, so every call reads its weights from device memory (the L2 is flushed by rotation).
The byte floor of a case is (weights of its distinct adapters + x + y read and written) over the
device-to-device copy bandwidth measured first.

    python -m benchmarks.bench_sgmv --out benchmarks/results/sgmv_<device>.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
from dataclasses import asdict, dataclass

import torch

from benchmarks.timing import copy_bandwidth, provenance, time_graph
from shard.model.layers.lora import (
    LoraBatch,
    LoraGroup,
    finish_lora,
    group_key,
    start_lora,
)
from shard.model.projections import LORA_GROUPS, MAX_GROUP_PROJECTIONS
from shard.ops import sgmv_expand, sgmv_shrink, weight_ptrs

DTYPE = torch.bfloat16
POPULARITY = ("distinct", "uniform", "skewed", "identical")
BATCHES = (1, 2, 4, 8, 16, 32, 64)
# One layer of a Llama 2 7B decode step: (name, h_in, h_out).
LLAMA7B_PROJECTIONS = (
    ("q", 4096, 4096),
    ("k", 4096, 4096),
    ("v", 4096, 4096),
    ("o", 4096, 4096),
    ("gate", 4096, 11008),
    ("up", 4096, 11008),
    ("down", 11008, 4096),
)
# The projections that share an input, as shard.model.layers.lora groups them (indices above).
LLAMA7B_GROUPS = ((0, 1, 2), (3,), (4, 5), (6,))


@dataclass(frozen=True, slots=True)
class Result:
    case: str
    popularity: str
    rows: int
    h_in: int
    rank: int
    h_out: int
    bytes: int  # weights of the distinct adapters + x + y read and written
    shrink_us: float
    expand_us: float
    sgmv_us: float  # shrink + expand
    gather_bmm_us: float
    loop_us: float


def adapters_of_rows(popularity: str, rows: int, rng: random.Random) -> list[int]:
    """Sorted adapter index per row (Punica's popularity distributions)."""
    if popularity == "distinct":
        return list(range(rows))
    if popularity == "identical":
        return [0] * rows
    n = rows if popularity == "skewed" else math.ceil(math.sqrt(rows))
    weights = [1.0 / (i + 1) ** 1.5 for i in range(n)] if popularity == "skewed" else None
    picks = rng.choices(range(n), weights=weights, k=rows)
    used = sorted(set(picks))
    return sorted(used.index(p) for p in picks)  # dense adapter ids 0..n_used-1


class Batch:
    """One input set: x, v, y and the weight stacks of the adapters its rows use."""

    def __init__(self, rows: list[int], ranks: list[int], h_in: int, h_out: int) -> None:
        n = max(rows) + 1
        ranks = [ranks[i % len(ranks)] for i in range(n)]  # adapter i's rank
        r_max = max(ranks)
        dev = "cuda"
        self.x = torch.randn(len(rows), h_in, device=dev, dtype=DTYPE)  # [T, h_in]
        self.y = torch.randn(len(rows), h_out, device=dev, dtype=DTYPE)  # [T, h_out]
        self.v = torch.empty(len(rows), r_max, device=dev, dtype=DTYPE)  # [T, r_max]
        # [n, L=1, r_max, h]; adapter i uses its first ranks[i] rows via its own contiguous stack.
        self.a = [torch.randn(1, ranks[i], h_in, device=dev, dtype=DTYPE) / 64 for i in range(n)]
        self.b = [torch.randn(1, ranks[i], h_out, device=dev, dtype=DTYPE) / 8 for i in range(n)]
        counts = [rows.count(i) for i in range(n)]
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        self.bounds = list(itertools.pairwise(starts))
        self.seg_starts = torch.tensor(starts, dtype=torch.int32, device=dev)
        self.ranks = torch.tensor(ranks, dtype=torch.int32, device=dev)
        self.scales = torch.full((n,), 0.5, device=dev)
        self.a_ptrs = weight_ptrs(self.a, dev)
        self.b_ptrs = weight_ptrs(self.b, dev)
        # gather+bmm needs one rank: stacks padded to r_max.
        self.a_all = torch.zeros(n, r_max, h_in, device=dev, dtype=DTYPE)  # [n, r_max, h_in]
        self.b_all = torch.zeros(n, r_max, h_out, device=dev, dtype=DTYPE)  # [n, r_max, h_out]
        for i in range(n):
            self.a_all[i, : ranks[i]] = self.a[i][0]
            self.b_all[i, : ranks[i]] = self.b[i][0]
        self.row_adapter = torch.tensor(rows, device=dev)  # [T]
        self.weight_bytes = sum(w.numel() * 2 for w in self.a + self.b)
        self.io_bytes = (self.x.numel() + 2 * self.y.numel()) * 2

    def shrink(self) -> None:
        sgmv_shrink(self.v, self.x, self.a_ptrs, self.seg_starts, self.ranks, 0)

    def expand(self) -> None:
        sgmv_expand(self.y, self.v, self.b_ptrs, self.seg_starts, self.ranks, self.scales, 0)

    def sgmv(self) -> None:
        self.shrink()
        self.expand()

    def gather_bmm(self) -> None:
        a = self.a_all[self.row_adapter]  # [T, r, h_in]
        b = self.b_all[self.row_adapter]  # [T, r, h_out]
        v = torch.bmm(self.x.unsqueeze(1), a.transpose(1, 2))  # [T, 1, r]
        self.y += torch.bmm(v, b).squeeze(1) * self.scales[self.row_adapter].unsqueeze(1)

    def loop(self) -> None:
        for i, (lo, hi) in enumerate(self.bounds):
            v = self.x[lo:hi] @ self.a[i][0].T  # [rows, r]
            self.y[lo:hi] += (v @ self.b[i][0]) * 0.5


def run_case(
    case: str, popularity: str, rows: int, ranks: list[int], h_in: int, h_out: int
) -> Result:
    rng = random.Random(rows * 7 + POPULARITY.index(popularity))
    adapter_rows = adapters_of_rows(popularity, rows, rng)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    first = Batch(adapter_rows, ranks, h_in, h_out)
    per_set = first.weight_bytes + first.io_bytes
    sets = [first] + [
        Batch(adapter_rows, ranks, h_in, h_out)
        for _ in range(min(256, math.ceil(3 * l2 / per_set)) - 1)
    ]
    times = {
        name: time_graph([getattr(b, name) for b in sets])
        for name in ("shrink", "expand", "sgmv", "gather_bmm", "loop")
    }
    return Result(
        case,
        popularity,
        rows,
        h_in,
        max(ranks),
        h_out,
        bytes=per_set,
        shrink_us=times["shrink"],
        expand_us=times["expand"],
        sgmv_us=times["sgmv"],
        gather_bmm_us=times["gather_bmm"],
        loop_us=times["loop"],
    )


def whole_step(layers: int = 32, rows: int = 32, rank: int = 16) -> dict[str, float]:
    """All LoRA work of one Llama-7B decode step: layers x 7 projections, Distinct, one graph."""
    dev = "cuda"
    seg_starts = torch.arange(rows + 1, dtype=torch.int32, device=dev)
    ranks = torch.full((rows,), rank, dtype=torch.int32, device=dev)
    scales = torch.full((rows,), 0.5, device=dev)
    projs = []
    weight_bytes = io_bytes = 0
    for _, h_in, h_out in LLAMA7B_PROJECTIONS:
        a = torch.randn(rows, layers, rank, h_in, device=dev, dtype=DTYPE) / 64  # per adapter
        b = torch.randn(rows, layers, rank, h_out, device=dev, dtype=DTYPE) / 8
        x = torch.randn(rows, h_in, device=dev, dtype=DTYPE)
        y = torch.randn(rows, h_out, device=dev, dtype=DTYPE)
        v = torch.empty(rows, rank, device=dev, dtype=DTYPE)
        a_ptrs, b_ptrs = weight_ptrs(a.unbind(), dev), weight_ptrs(b.unbind(), dev)
        projs.append((a, b, x, y, v, a_ptrs, b_ptrs))
        weight_bytes += (a.numel() + b.numel()) * 2
        io_bytes += layers * (x.numel() + 2 * y.numel()) * 2
    idx = torch.arange(rows, device=dev)

    def ours() -> None:
        for layer in range(layers):
            for _, _, x, y, v, a_ptrs, b_ptrs in projs:
                sgmv_shrink(v, x, a_ptrs, seg_starts, ranks, layer)
                sgmv_expand(y, v, b_ptrs, seg_starts, ranks, scales, layer)

    # One shrink and one expand per group: [P, S] tables, one x, y the merged layer's output.
    grouped = []
    for members in LLAMA7B_GROUPS:
        n = len(members)
        widths = [LLAMA7B_PROJECTIONS[i][2] for i in members]
        grouped.append(
            (
                projs[members[0]][2],  # x
                torch.randn(rows, sum(widths), device=dev, dtype=DTYPE),  # y
                torch.empty(rows, n * rank, device=dev, dtype=DTYPE),  # v
                torch.stack([projs[i][5] for i in members]),  # a_ptrs [P, S]
                torch.stack([projs[i][6] for i in members]),  # b_ptrs [P, S]
                ranks.expand(n, rows).contiguous(),
                scales.expand(n, rows).contiguous(),
                widths,
            )
        )

    def ours_grouped() -> None:
        for layer in range(layers):
            for x, y, v, a_ptrs, b_ptrs, g_ranks, g_scales, widths in grouped:
                sgmv_shrink(v, x, a_ptrs, seg_starts, g_ranks, layer)
                sgmv_expand(y, v, b_ptrs, seg_starts, g_ranks, g_scales, layer, widths)

    # As the model runs it: start_lora + finish_lora per group, the delta added as the model's
    # next chain does (no base GEMM to hide under here).
    lora = LoraBatch(
        seg_starts=seg_starts,
        groups={
            group_key(modules): LoraGroup(a_ptrs, b_ptrs, g_ranks, g_scales)
            for modules, (_, _, _, a_ptrs, b_ptrs, g_ranks, g_scales, _) in zip(
                LORA_GROUPS, grouped, strict=True
            )
        },
        buffer=torch.empty(rows, MAX_GROUP_PROJECTIONS * rank, device=dev, dtype=DTYPE),
    )

    def production() -> None:
        for layer in range(layers):
            for modules, (x, y, _, _, _, _, _, widths) in zip(LORA_GROUPS, grouped, strict=True):
                delta = finish_lora(start_lora(x, lora, modules, widths, layer))
                if delta is not None:
                    y += delta

    def gather_bmm() -> None:
        for layer in range(layers):
            for a, b, x, y, _, _, _ in projs:
                v = torch.bmm(x.unsqueeze(1), a[idx, layer].transpose(1, 2))
                y += torch.bmm(v, b[idx, layer]).squeeze(1) * 0.5

    return {
        "layers": layers,
        "projections": len(LLAMA7B_PROJECTIONS),
        "rows": rows,
        "rank": rank,
        "weight_gb": weight_bytes / 1e9,
        "bytes": weight_bytes + io_bytes,
        "sgmv_us": time_graph([ours], reps=10),
        "sgmv_grouped_us": time_graph([ours_grouped], reps=10),
        "production_us": time_graph([production], reps=10),  # "add_lora_us" up to v8
        "gather_bmm_us": time_graph([gather_bmm], reps=3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--commit", default=None, help="git commit measured (default: HEAD)")
    parser.add_argument("--command", default="python -m benchmarks.bench_sgmv", help="recorded")
    args = parser.parse_args()

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s")
    results: list[Result] = []
    for pop in POPULARITY:
        for rows in BATCHES:
            results.append(run_case("decode 4096-r16-11008", pop, rows, [16], 4096, 11008))
    mixed = [4, 8, 16, 32, 64, 128]
    for rows in (8, 32, 64):
        results.append(run_case("decode mixed ranks", "distinct", rows, mixed, 4096, 4096))
    for h_in, r, h_out in ((11008, 16, 4096), (4096, 64, 1024), (8192, 16, 28672)):
        results.append(run_case(f"decode {h_in}-r{r}-{h_out}", "distinct", 32, [r], h_in, h_out))
    for rows in (256, 1024):
        results.append(run_case("prefill 4096-r16-11008", "uniform", rows, [16], 4096, 11008))
    step = whole_step()
    bw = max(bw, copy_bandwidth())  # again, with a warm GPU: floors use the better of the two
    step["floor_us"] = step["bytes"] / bw * 1e6
    print(f"copy bandwidth (best of two) {bw / 1e12:.2f} TB/s")

    header = f"{'case':26} {'pop':9} {'T':>4} {'floor':>7} {'shrink':>7} {'expand':>7} {'sgmv':>7} "
    print(header + f"{'gbmm':>8} {'loop':>8}  (us)")
    for r in results:
        floor = r.bytes / bw * 1e6
        print(
            f"{r.case:26} {r.popularity:9} {r.rows:4d} {floor:7.1f} {r.shrink_us:7.1f} "
            f"{r.expand_us:7.1f} {r.sgmv_us:7.1f} {r.gather_bmm_us:8.1f} {r.loop_us:8.1f}"
        )
    print(
        f"7B decode step ({step['layers']} layers x 7 proj, r={step['rank']}, B={step['rows']}): "
        f"floor {step['floor_us']:.0f} us, sgmv {step['sgmv_us']:.0f} us, "
        f"grouped {step['sgmv_grouped_us']:.0f} us, production {step['production_us']:.0f} us, "
        f"gather+bmm {step['gather_bmm_us']:.0f} us"
    )
    report = provenance(args.command, args.commit, bw) | {
        "dtype": str(DTYPE),
        "l2_bytes": torch.cuda.get_device_properties(0).L2_cache_size,
        "cases": [asdict(r) | {"floor_us": r.bytes / bw * 1e6} for r in results],
        "whole_step": step,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
