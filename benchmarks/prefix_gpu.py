"""The prefix cache's time to first token on one GPU (issue 22): cache on against cache off.

A shard of the 7B shape (`--load-format dummy`, bf16) with N PEFT r16 adapters on all seven
projections, behind a router, started twice: with `--prefix-cache off`, then `on`. Both runs get
the same seeded open-loop workload: every prompt is one shared system prompt
(`--shared-prefix-tokens`, 1,000 by default) and then its own tokens, on a Zipf choice of the
adapters and the base model. Before each measured run every adapter (and the base model) gets
one request with the system prompt: it loads the adapter, and with the cache on computes that
adapter's prefix blocks, as in a server that has been up a while (keys and values are never
shared across adapters, so each adapter's first request misses). The report gives each run's
TTFT, ITL and end-to-end percentiles, the shard's prefix hit rate in tokens over the measured
run, and the ratio of the TTFT p50s (the issue's target: on <= 0.25 x off).

    python -m benchmarks.prefix_gpu --out benchmarks/results/prefix_h100.json

`--shape tiny --device cpu` runs it all on a CPU in seconds (the test, and the smoke run in
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.bench_serving import Arrival, LoadSpec, make_workload, run_load
from benchmarks.serving_gpu import add_shard_arguments, prepare_shard, serving
from benchmarks.serving_stats import summarize
from benchmarks.timing import provenance
from benchmarks.workloads import SHAPES

# The target: TTFT p50 with the cache on at most this share of the TTFT p50 without.
TARGET_RATIO = 0.25
_PREFIX_COUNTERS = ("prefix_prompt_tokens_total", "prefix_hit_tokens_total")


def prefix_tokens(port: int) -> dict[str, float]:
    """The shard's prefix-cache token counters, summed over adapters."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    sums = dict.fromkeys(_PREFIX_COUNTERS, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("lorafleet_shard_")
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def warm_up(router: str, spec: LoadSpec) -> None:
    """One request per adapter with the shared prefix, all at once (see the module docstring)."""
    prefix = make_workload(spec)[0].prompt_ids[: spec.shared_prefix_tokens]
    warm = [Arrival(0.0, adapter, (*prefix, 5, 6, 7), 2) for adapter in spec.adapters]
    outcomes, _ = asyncio.run(run_load(router, warm, timeout_s=600.0))
    if failed := [o.error for o in outcomes if o.error is not None]:
        raise RuntimeError(f"warm-up requests failed: {failed}")


def measure(
    logs: Path, flags: list[str], cache: str, spec: LoadSpec
) -> dict[str, float | int | dict | str]:
    """One run: a fresh shard with `--prefix-cache cache`, warmed, then the open loop."""
    started = time.monotonic()
    with serving(logs, [*flags, "--prefix-cache", cache]) as (router, metrics):
        start_s = time.monotonic() - started
        warm_up(router, spec)
        before = prefix_tokens(metrics)
        outcomes, duration = asyncio.run(run_load(router, make_workload(spec), timeout_s=600.0))
        after = prefix_tokens(metrics)
    prompt, hit = (after[c] - before[c] for c in _PREFIX_COUNTERS)
    return {
        "prefix_cache": cache,
        "shard_start_s": round(start_s, 1),
        **summarize(outcomes, duration),
        # Prompt tokens of the admissions that looked up the cache (none with it off).
        "prefix_lookup_tokens": int(prompt),
        "prefix_hit_tokens": int(hit),
        "prefix_hit_rate": round(hit / prompt, 4) if prompt else 0.0,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON path")
    # 32: the load keeps the batch well below it, and fewer decode graphs to capture at start.
    add_shard_arguments(p, max_batch_size=32)
    p.add_argument("--shared-prefix-tokens", type=int, default=1000)
    p.add_argument("--prompt-tokens", type=_range, default=(16, 64), metavar="MIN:MAX")
    p.add_argument("--output-tokens", type=_range, default=(16, 64), metavar="MIN:MAX")
    p.add_argument("--rate", type=float, default=4.0, help="mean requests per second")
    p.add_argument("--seconds", type=float, default=30.0, help="offered load per run")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logs", type=Path, default=None, help="shard and router logs (default: tmp)")
    p.add_argument("--command", default="python -m benchmarks.prefix_gpu")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    workdir = Path(tempfile.mkdtemp(prefix="prefix-gpu-"))
    flags = prepare_shard(args, workdir)
    spec = LoadSpec(
        requests=max(1, round(args.rate * args.seconds)),
        rate=args.rate,
        adapters=(*(f"a{i}" for i in range(args.adapters)), ""),
        zipf_s=args.zipf_s,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        vocab_size=shape["vocab_size"],
        seed=args.seed,
        shared_prefix_tokens=args.shared_prefix_tokens,
    )
    report: dict = {"benchmark": "prefix_gpu"} | provenance(
        args.command, args.commit, None, args.device
    )
    report |= {"shape_name": args.shape, "shape": shape, "adapters": args.adapters}
    report |= {"shard_flags": flags[4:], "load": dataclasses.asdict(spec)}
    logs = args.logs or workdir
    runs = {}
    for cache in ("off", "on"):
        (logs / cache).mkdir(parents=True, exist_ok=True)
        runs[cache] = measure(logs / cache, flags, cache, spec)
        print(json.dumps({k: runs[cache][k] for k in ("prefix_cache", "ttft_ms", "ok")}))
        sys.stdout.flush()
    report["runs"] = runs
    ratio = runs["on"]["ttft_ms"]["p50"] / runs["off"]["ttft_ms"]["p50"]  # type: ignore[index]
    report["ttft_p50_on_over_off"] = round(ratio, 4)
    report["target_ratio"] = TARGET_RATIO
    report["target_met"] = ratio <= TARGET_RATIO
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}: TTFT p50 on/off = {ratio:.3f} (target <= {TARGET_RATIO})")
    return report


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


if __name__ == "__main__":
    main()
