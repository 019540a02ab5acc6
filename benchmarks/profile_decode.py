"""Where a decode step's time goes: GPU kernel time by kind (GEMM, attention, SGMV, fused and
plain elementwise) against the step's byte floor, for the base model and for Distinct adapters.

The text-generation benchmark gives the step time; this one explains it. One decode plan
(`--batch` rows at `--context` tokens, Llama-2-7B shape, dummy bf16 weights, r16 adapters on all
seven projections) runs eagerly under torch.profiler: with the defaults (compiled elementwise
chains, cuBLASLt for the projections), then with each switched. Per kind it reports
milliseconds per step, launches per step and, for GEMMs, the weight bytes read per second. The
CUDA-graph replay of the same step is timed with CUDA events beside it: replay minus kernel time
is what launch gaps and tails cost.

`python -m benchmarks.profile_decode --out profile.json`
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_textgen import hbm_floor_ms, write_model_dir
from benchmarks.peft_baseline import write_adapters
from benchmarks.timing import copy_bandwidth, provenance
from benchmarks.workloads import SHAPES, Workload, decode_step, decode_step_ms
from shard.compose import build_engine
from shard.config import parse_config
from shard.engine.decode_graphs import DecodeGraphs
from shard.model import fusion
from shard.parallel.group import SINGLE
from shard.parallel.rank import RankState

TOP = 16  # kernels listed by name per row
# Kernel-name patterns, first match wins; anything else is plain (unfused) elementwise work.
KINDS = (
    ("sgmv", re.compile(r"sgmv|shrink|expand", re.I)),
    ("attention", re.compile(r"paged|decode_attention|kv_append|flash|attention", re.I)),
    ("gemm", re.compile(r"gemm|gemv|nvjet|xmma|cutlass|matmul|splitk", re.I)),
    ("fused", re.compile(r"triton", re.I)),
)


@dataclass(frozen=True, slots=True)
class Share:
    name: str  # a kernel kind, or a kernel's name
    ms_per_step: float
    launches_per_step: float


def kind_of(kernel: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(kernel)), "elementwise")


def kernel_times(
    state: RankState, adapters: list[str], context: int, steps: int
) -> tuple[list[Share], list[Share]]:
    """GPU kernel time per decode step by kind, and of the TOP kernels by name, from an eager
    run under the profiler."""
    runner, kv = state.runner, state.kv
    step, pages = decode_step(kv, state.adapters.weights, adapters, context)
    graphs, runner.decode_graphs = runner.decode_graphs, None
    try:
        for _ in range(3):  # warm-up: compiled chains built, cuBLAS heuristics cached
            runner.forward(step)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner.forward(step)
            torch.cuda.synchronize()
    finally:
        runner.decode_graphs = graphs
        kv.pool.release(pages)
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0
    ]
    by_kind = _totals(((kind_of(e.name), e.device_time) for e in kernels), steps)
    by_name = _totals(((e.name[:120], e.device_time) for e in kernels), steps)
    return by_kind, by_name[:TOP]


def _totals(items: Iterable[tuple[str, float]], steps: int) -> list[Share]:
    """Per-step milliseconds and launches of each key of (key, microseconds) items, largest
    first."""
    total_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for key, us in items:
        total_us[key] += us
        count[key] += 1
    return [
        Share(key, total_us[key] / steps / 1e3, count[key] / steps)
        for key in sorted(total_us, key=total_us.get, reverse=True)  # type: ignore[arg-type]
    ]


def graph_ms(state: RankState, adapters: list[str], context: int) -> float:
    """The same step replayed from a CUDA graph captured afresh (a new DecodeGraphs, so the
    chains are captured as they are now: plain or compiled), CUDA-event timed."""
    runner, old = state.runner, state.runner.decode_graphs
    if old is not None:
        runner.decode_graphs = DecodeGraphs(
            runner.model, state.kv, old.max_batch, old.max_pages, runner.device, use_graphs=True
        )
    return decode_step_ms(
        state.kv, runner.forward, state.adapters.weights, runner.device, adapters, context
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=272)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--command", default="python -m benchmarks.profile_decode")
    parser.add_argument("--commit", default=None, help="default: git rev-parse HEAD")
    args = parser.parse_args(argv)
    shape = SHAPES["llama2-7b"]
    bandwidth = copy_bandwidth()
    root = Path(tempfile.mkdtemp(prefix="profile-"))
    model_dir, adapter_dir = root / "model", root / "adapters"
    write_model_dir(model_dir, shape)
    write_adapters(model_dir, adapter_dir, args.batch, 16, "cuda")
    argv = ["--model", str(model_dir), "--adapters", str(adapter_dir), "--device", "cuda"]
    argv += ["--dtype", "bfloat16", "--load-format", "dummy", "--kv-memory-fraction", "0.5"]
    argv += ["--max-batch-size", str(args.batch), "--adapter-memory-mb", "8192"]
    _, _, leader = build_engine(parse_config(argv, env={}), SINGLE)
    state = leader.state
    weight_bytes = sum(p.numel() * p.element_size() for p in state.runner.model.parameters())
    cases = {"base": [""] * args.batch, "distinct": [f"a{i}" for i in range(args.batch)]}
    for adapter in cases["distinct"]:
        if (err := state.adapters.preload(adapter, pin=False, timeout_s=60)) is not None:
            raise RuntimeError(f"adapter {adapter}: {err}")
    rows = []
    # (compiled chains, the projections' BLAS library): the defaults first, then each alternative.
    configs = ((True, "cublaslt"), (False, "cublaslt"), (True, "cublas"))
    for compiled, blas in configs:
        fusion.set_enabled(compiled)
        torch.backends.cuda.preferred_blas_library(blas)
        for case, adapters in cases.items():
            kinds, top = kernel_times(state, adapters, args.context, args.steps)
            work = Workload(case, [[0]] * args.batch, [1] * args.batch, adapters)
            row = {
                "case": case,
                "compiled": compiled,
                "blas": blas,
                "graph_step_ms": graph_ms(state, adapters, args.context),
                "kernel_ms": sum(k.ms_per_step for k in kinds),
                "launches": sum(k.launches_per_step for k in kinds),
                "floor_ms": hbm_floor_ms(state, work, args.context, bandwidth),
                "kinds": [asdict(k) for k in kinds],
                "top_kernels": [asdict(k) for k in top],
            }
            gemm = next((k for k in kinds if k.name == "gemm"), None)
            if gemm is not None:
                row["gemm_weight_tb_s"] = weight_bytes / (gemm.ms_per_step * 1e-3) / 1e12
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"benchmark": "profile_decode"} | provenance(args.command, args.commit, bandwidth)
    report |= {
        "batch": args.batch,
        "context": args.context,
        "weight_gb": weight_bytes / 1e9,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
