"""Serving under real traffic on one GPU (issue 16), in one run on one machine:

1. a shard of the 7B shape (`--load-format dummy`, bf16) with N PEFT r16 adapters on all seven
   projections, behind a router; the short workload (prompts 64-512, outputs 64-256, Zipf over
   the adapters and the base model) open loop at each `--rates` rate: the capacity curve
   (output tok/s, TTFT and ITL p50/p90/p99 against offered rate), and the shard's own mean batch
   and mean step over each rate (from its Prometheus histograms);
2. the long workload (prompts 1,024-3,500, outputs 32-256) at `--long-rate`;
3. the shard stops; in this process an engine with the same flags runs the mixed-step
   microbenchmark (benchmarks/mixed_step.py: decode batch B of distinct adapters and the base
   model plus one N-token prefill) against the decode-only step and the step's floor (weights and
   adapters over the copy bandwidth, or the step's FLOPs over measured matmul throughput,
   whichever is larger), a torch.profiler pass on one mixed case (kernel time against wall
   time), and the closed-batch decode throughput at each rate's mean batch, so each rate's
   "served / decode capacity" ratio comes from one run.

    python -m benchmarks.serving_gpu --out benchmarks/results/serving_gpu_h100.json

JSON (device, date, commit, command) and a plot beside it (throughput and ITL p99 against
offered rate). `--shape tiny --device cpu` runs every part on a CPU in seconds (the test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.bench_serving import LoadSpec, make_workload, run_load
from benchmarks.bench_textgen import write_model_dir
from benchmarks.peft_baseline import write_adapters
from benchmarks.serving_engine import in_process
from benchmarks.serving_procs import launch, require_serving, stop_all, wait_placing
from benchmarks.serving_stats import summarize
from benchmarks.timing import provenance
from benchmarks.workloads import SHAPES
from router.local_process import free_port

SHORT = ((64, 512), (64, 256))  # (prompt tokens, output tokens), inclusive ranges
LONG = ((1024, 3500), (32, 256))
# Saturation: the highest offered rate still served within these (the definition).
ITL_P99_LIMIT_MS = 50.0
TTFT_P99_LIMIT_MS = 2000.0


def add_shard_arguments(p: argparse.ArgumentParser, max_batch_size: int) -> None:
    """The options `prepare_shard` reads (shared with benchmarks.prefix_gpu)."""
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--shape", default="llama2-7b", choices=tuple(SHAPES))
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=max_batch_size)
    p.add_argument("--max-prefill-tokens", type=int, default=2048)


def prepare_shard(args: argparse.Namespace, workdir: Path) -> list[str]:
    """Writes the model folder of `args.shape` and `args.adapters` PEFT r16 adapters under
    `workdir`; the flags of a shard serving them."""
    model, adapters = workdir / "model", workdir / "adapters"
    write_model_dir(model, SHAPES[args.shape])
    write_adapters(model, adapters, args.adapters, 16, args.device)
    return shard_flags(args, model, adapters)


def shard_flags(args: argparse.Namespace, model: Path, adapters: Path) -> list[str]:
    """The shard's flags, the same for the served shard and the in-process engine."""
    cuda = args.device == "cuda"
    flags = ["--model", str(model), "--adapters", str(adapters), "--device", args.device]
    flags += ["--dtype", "bfloat16" if cuda else "float32", "--load-format", "dummy"]
    flags += ["--max-batch-size", str(args.max_batch_size), "--adapter-memory-mb", "8192"]
    flags += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    flags += ["--kv-memory-fraction", "0.85"] if cuda else ["--kv-pages", "4096"]
    return flags


@contextmanager
def serving(workdir: Path, flags: list[str]) -> Iterator[tuple[str, int]]:
    """A shard (metrics on a port) and a router in front of it: (router address, metrics
    port). Logs in `workdir`."""
    shard_port, router_port, metrics = free_port(), free_port(), free_port()
    shard, router = f"127.0.0.1:{shard_port}", f"127.0.0.1:{router_port}"
    shard_cmd = [sys.executable, "-m", "shard", *flags, "--host", "127.0.0.1"]
    shard_cmd += ["--port", str(shard_port), "--metrics-port", str(metrics)]
    router_cmd = [sys.executable, "-m", "router", "--host", "127.0.0.1"]
    router_cmd += ["--port", str(router_port), "--shard", shard]
    procs: list = []
    try:
        require_serving(shard, launch(procs, workdir, "shard", None, shard_cmd), 900.0)
        require_serving(router, launch(procs, workdir, "router", None, router_cmd))
        wait_placing(router)
        yield router, metrics
    finally:
        stop_all(procs)


def scrape(port: int) -> dict[str, float]:
    """The shard's step and batch histograms' sums and counts."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in {
            f"lorafleet_shard_{h}_{s}"
            for h in ("step_seconds", "batch_size")
            for s in (
                "sum",
                "count",
            )
        }:
            out[name.removeprefix("lorafleet_shard_")] = float(value)
    return out


def open_loop(router: str, metrics: int, spec: LoadSpec) -> dict:
    """One open-loop run: the client's summary, plus the shard's mean batch and step."""
    before = scrape(metrics)
    outcomes, duration = asyncio.run(run_load(router, make_workload(spec), timeout_s=600.0))
    after = scrape(metrics)
    steps = after["step_seconds_count"] - before["step_seconds_count"]
    row = {"offered_rate": spec.rate} | summarize(outcomes, duration)
    row["mean_batch"] = (after["batch_size_sum"] - before["batch_size_sum"]) / max(steps, 1)
    row["mean_step_ms"] = (after["step_seconds_sum"] - before["step_seconds_sum"]) / max(steps, 1)
    row["mean_step_ms"] *= 1e3
    row["steps"] = int(steps)
    return row


def saturation(curve: list[dict]) -> dict | None:
    """The highest offered rate served with ITL p99 and TTFT p99 within the limits."""
    within = [
        r
        for r in curve
        if r["itl_ms"]["p99"] <= ITL_P99_LIMIT_MS and r["ttft_ms"]["p99"] <= TTFT_P99_LIMIT_MS
    ]
    return max(within, key=lambda r: r["offered_rate"]) if within else None


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["short"]
    rates = [r["offered_rate"] for r in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(rates, [r["output_tokens_per_s"] for r in curve], "o-", label="served")
    decode = {c["batch"]: c["tokens_per_s"] for c in report["in_process"]["closed_batch"]}
    left.plot(
        rates,
        [decode.get(max(1, round(r["mean_batch"])), math.nan) for r in curve],
        "s--",
        label="closed-batch decode at the mean batch",
    )
    left.set_xlabel("offered rate (req/s)")
    left.set_ylabel("output tokens/s")
    left.legend()
    right.plot(rates, [r["itl_ms"]["p99"] for r in curve], "o-", label="ITL p99")
    right.plot(rates, [r["ttft_ms"]["p50"] for r in curve], "s-", label="TTFT p50")
    right.axhline(ITL_P99_LIMIT_MS, color="gray", linestyle=":")
    right.set_xlabel("offered rate (req/s)")
    right.set_ylabel("ms")
    right.set_yscale("log")
    right.legend()
    fig.suptitle(f"{report['shape_name']}, {report['adapters']} adapters r16 + base, open loop")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def headline(row: dict) -> dict:
    """One open-loop rate's figures that a log line shows."""
    keys = ("offered_rate", "requests_per_s", "output_tokens_per_s", "mean_batch")
    return {k: row[k] for k in keys} | {
        f"{name}_{q}": row[f"{name}_ms"][q] for name in ("ttft", "itl") for q in ("p50", "p99")
    }


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON path; the PNG goes beside")
    add_shard_arguments(p, max_batch_size=64)
    p.add_argument(
        "--rates", type=lambda t: [float(v) for v in t.split(",")], default="2,4,8,12,16"
    )
    p.add_argument("--seconds", type=float, default=40.0, help="offered load per rate")
    p.add_argument("--long-rate", type=float, default=4.0, help="0: no long workload")
    p.add_argument("--short", type=lambda t: json.loads(t), default=SHORT, help="JSON lengths")
    p.add_argument("--long", type=lambda t: json.loads(t), default=LONG, help="JSON lengths")
    p.add_argument("--mixed-batches", type=_ints, default="8,32,64")
    p.add_argument("--mixed-tokens", type=_ints, default="16,256,1024,2048")
    p.add_argument("--decode-context", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="torch.profiler pass (CUDA)")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--command", default="python -m benchmarks.serving_gpu")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    workdir = Path(tempfile.mkdtemp(prefix="serving-gpu-"))
    flags = prepare_shard(args, workdir)
    names = (*(f"a{i}" for i in range(args.adapters)), "")

    def spec(rate: float, lengths: list, seconds: float) -> LoadSpec:
        (p_lo, p_hi), (o_lo, o_hi) = lengths
        count = max(1, round(rate * seconds))
        return LoadSpec(
            count,
            rate,
            names,
            args.zipf_s,
            (p_lo, p_hi),
            (o_lo, o_hi),
            shape["vocab_size"],
            args.seed,
        )

    report: dict = {"benchmark": "serving_gpu"} | provenance(
        args.command, args.commit, None, args.device
    )
    report |= {"shape_name": args.shape, "shape": shape, "adapters": args.adapters}
    report |= {"shard_flags": flags[4:], "short_lengths": args.short, "long_lengths": args.long}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # After every phase, so a run cut short by a crash or a time limit keeps what it measured.
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    with serving(workdir, flags) as (router, metrics):
        warm = spec(max(args.rates), args.short, 2.0)
        asyncio.run(run_load(router, make_workload(warm), timeout_s=600.0))
        report["short"] = []
        for rate in args.rates:
            row = open_loop(router, metrics, spec(rate, args.short, args.seconds))
            report["short"].append(row)
            print(json.dumps(headline(row)), flush=True)
            save()
        report["saturation"] = saturation(report["short"])
        if args.long_rate:
            report["long"] = open_loop(
                router, metrics, spec(args.long_rate, args.long, args.seconds)
            )
            print(json.dumps(headline(report["long"])), flush=True)
            save()
    batches = [max(1, round(r["mean_batch"])) for r in report["short"]]
    report["in_process"] = in_process(args, flags, batches)
    decode = {c["batch"]: c["tokens_per_s"] for c in report["in_process"]["closed_batch"]}
    for row, batch in zip(report["short"], batches, strict=True):
        row["closed_batch_tokens_per_s"] = decode[batch]
        row["served_over_decode"] = row["output_tokens_per_s"] / decode[batch]
    save()
    print(f"wrote {args.out}")
    plot(report, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
