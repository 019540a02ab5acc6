"""The serving benchmark's load generator and statistics (not its timings)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_serving import (
    LoadSpec,
    main,
    make_workload,
    run_interleaved,
    run_load,
)
from benchmarks.serving_procs import pinned
from benchmarks.serving_stats import (
    Outcome,
    median_difference_ci,
    open_loop_report,
    percentile,
    summarize,
)
from tests.fleet import Router

SPEC = LoadSpec(
    requests=4000,
    rate=50.0,
    adapters=("hot", "warm", "cold", ""),
    zipf_s=1.0,
    prompt_tokens=(3, 9),
    output_tokens=(2, 5),
    vocab_size=100,
    seed=7,
)


def test_workload_is_seeded_poisson_zipf_and_in_range() -> None:
    workload = make_workload(SPEC)
    assert workload == make_workload(SPEC)
    assert workload != make_workload(dataclasses.replace(SPEC, seed=8))
    times = [a.at_s for a in workload]
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert all(g > 0 for g in gaps)
    # Exponential gaps: mean 1/rate and standard deviation equal to the mean.
    assert statistics.mean(gaps) == pytest.approx(1 / SPEC.rate, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / SPEC.rate, rel=0.1)
    counts = collections.Counter(a.adapter_id for a in workload)
    # Zipf with s = 1: shares 1 : 1/2 : 1/3 : 1/4 of 25/12.
    for rank, adapter in enumerate(SPEC.adapters, start=1):
        assert counts[adapter] / len(workload) == pytest.approx(12 / 25 / rank, rel=0.1)
    assert {len(a.prompt_ids) for a in workload} == set(range(3, 10))
    assert {a.max_new_tokens for a in workload} == set(range(2, 6))
    assert all(3 <= t < SPEC.vocab_size for a in workload for t in a.prompt_ids)


def test_a_shared_prefix_starts_every_prompt_and_leaves_the_rest_unchanged() -> None:
    spec = dataclasses.replace(SPEC, requests=300, shared_prefix_tokens=40)
    plain, shared = (
        make_workload(dataclasses.replace(spec, shared_prefix_tokens=0)),
        make_workload(spec),
    )
    prefix = shared[0].prompt_ids[:40]
    assert len(set(prefix)) > 10  # seeded tokens, not one repeated id
    for a, b in zip(plain, shared, strict=True):
        assert b.prompt_ids == prefix + a.prompt_ids
        assert (a.at_s, a.adapter_id, a.max_new_tokens) == (b.at_s, b.adapter_id, b.max_new_tokens)
    assert make_workload(dataclasses.replace(spec, seed=8))[0].prompt_ids[:40] != prefix


def test_percentiles_and_summary() -> None:
    assert percentile([], 50) != percentile([], 50)  # NaN
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert percentile([7.0], 99) == 7.0
    outcomes = [
        Outcome("a", 0.0, 0.0, [0.010, 0.020, 0.040], 0.050),
        Outcome("b", 0.5, 0.497, [0.030, 0.035], 0.040),
        Outcome("c", 1.0, 1.0, error="RESOURCE_EXHAUSTED"),
    ]
    summary = summarize(outcomes, duration_s=2.0)
    assert (summary["requests"], summary["ok"]) == (3, 2)
    assert summary["errors"] == {"RESOURCE_EXHAUSTED": 1}
    assert summary["requests_per_s"] == 1.0
    assert summary["output_tokens_per_s"] == 2.5
    assert summary["ttft_ms"]["p50"] == 20.0
    assert summary["itl_ms"]["p50"] == 10.0  # gaps 10, 20 and 5 ms
    assert summary["e2e_ms"]["p50"] == 45.0
    assert summary["send_lag_ms_max"] == 3.0


def test_open_loop_run_against_a_router(fleet) -> None:
    spec = LoadSpec(12, 200.0, ("a", "b", ""), 1.1, (2, 6), (3, 7), 32000, seed=1)
    workload = make_workload(spec)
    outcomes, duration = asyncio.run(run_load(fleet.router.address, workload))
    assert [o.adapter_id for o in outcomes] == [a.adapter_id for a in workload]
    for arrival, outcome in zip(workload, outcomes, strict=True):
        assert outcome.error is None
        assert len(outcome.token_times) == arrival.max_new_tokens
        assert outcome.token_times == sorted(outcome.token_times)
        assert 0 < outcome.token_times[-1] <= outcome.end_s
    # Open loop: each request went out at its scheduled time, whatever the earlier ones did.
    assert all(abs(o.sent_s - a.at_s) < 0.05 for a, o in zip(workload, outcomes, strict=True))
    assert duration >= workload[-1].at_s
    summary = summarize(outcomes, duration)
    assert summary["ok"] == 12 and summary["ttft_ms"]["p50"] > 0


def test_interleaved_run_deals_requests_to_the_targets_in_turn(fleet, launch) -> None:
    routers = [launch(Router, *(f"--shard={f.address}" for f in fleet.fakes)) for _ in range(2)]
    for router in routers:
        router.wait_shards([f.address for f in fleet.fakes])
    targets = (fleet.router.address, *(r.address for r in routers))
    spec = LoadSpec(10, 200.0, ("a", "b", ""), 1.1, (2, 6), (3, 7), 32000, seed=2)
    workload = make_workload(spec)
    for shift in (0, 1, 2):
        split, duration = asyncio.run(run_interleaved(targets, workload, shift))
        # Request i went to targets[(i + shift) % 3], in order, and each finished in full.
        for arm, target in enumerate(targets):
            sent = [w for i, w in enumerate(workload) if (i + shift) % 3 == arm]
            outcomes = split[target]
            assert [o.adapter_id for o in outcomes] == [w.adapter_id for w in sent]
            assert [len(o.token_times) for o in outcomes] == [w.max_new_tokens for w in sent]
            assert all(o.error is None for o in outcomes)
            assert all(abs(o.sent_s - w.at_s) < 0.05 for w, o in zip(sent, outcomes, strict=True))
        assert duration >= workload[-1].at_s


def test_median_difference_interval_covers_the_true_shift() -> None:
    rng = random.Random(3)
    base = [rng.uniform(0.005, 0.015) for _ in range(400)]
    shifted = [t + 0.001 for t in (rng.uniform(0.005, 0.015) for _ in range(400))]
    low, high = median_difference_ci(base, shifted)
    assert low < 0.001 < high
    # A few hundred draws from a 10 ms wide spread pin the median to within about a millisecond.
    assert 0.0002 < high - low < 0.002
    same_low, same_high = median_difference_ci(base, base)
    assert same_low <= 0.0 <= same_high


def test_open_loop_report_prices_each_proxy_against_the_shard() -> None:
    def arm(ttfts_ms: list[float], itl_ms: float) -> list[Outcome]:
        return [
            Outcome("a", 0.0, 0.0, [t / 1000, t / 1000 + itl_ms / 1000], t / 1000 + 0.02)
            for t in ttfts_ms
        ]

    direct = [float(t) for t in range(10, 31)]
    arms = {
        "shard_direct": arm(direct, 5.0),
        "through_router": arm([t + 2.0 for t in direct], 5.5),
        "through_passthrough": arm([t + 1.0 for t in direct], 5.0),
    }
    report = open_loop_report(arms, duration_s=10.0)
    assert report["shard_direct"]["ttft_ms"]["p50"] == 20.0
    router, passthrough = report["router_added_ms"], report["passthrough_added_ms"]
    assert router["ttft_ms"]["p50"] == 2.0 and passthrough["ttft_ms"]["p50"] == 1.0
    assert router["itl_ms"]["p50"] == 0.5 and passthrough["itl_ms"]["p50"] == 0.0
    low, high = router["ttft_ms"]["p50_ci95"]
    assert low <= 2.0 <= high
    assert "shard_direct_added_ms" not in report


def test_report_against_a_target_carries_the_shared_header(fleet, tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    args = ["--target", fleet.router.address, "--requests", "4", "--rate", "100"]
    args += ["--prompt-tokens", "2:4", "--output-tokens", "2:3", "--commit", "abc1234"]
    args += ["--out", str(out)]
    main(args)
    report = json.loads(out.read_text())
    assert report["benchmark"] == "serving" and report["machine"]["cores"] == os.cpu_count()
    assert report["command"] == shlex.join(["python", "-m", "benchmarks.bench_serving", *args])
    assert report["commit"] == "abc1234" and report["torch"] and report["date"]
    # The client does not know a target's device, and measures no copy bandwidth.
    assert report["device"] is None and report["copy_bandwidth_tbps"] is None
    assert report["results"]["target"]["ok"] == 4


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_pinned_process_runs_on_the_given_cpus() -> None:
    cpu = max(os.sched_getaffinity(0))
    show = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    assert pinned(None, show) == show
    done = subprocess.run(pinned(str(cpu), show), capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"[{cpu}]"


def test_unknown_mode_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--target", "127.0.0.1:1", "--modes", "paired,closed-loop"])
    assert "--modes: unknown closed-loop" in capsys.readouterr().err


def test_gpu_serving_suite_runs_every_part_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks.serving_gpu end to end with the tiny shape: two offered rates, the long
    workload, mixed steps against decode-only steps, closed-batch decode at each mean batch."""
    from benchmarks import serving_gpu

    out = tmp_path / "serving_gpu.json"
    args = ["--out", str(out), "--device", "cpu", "--shape", "tiny", "--adapters", "2"]
    args += ["--max-batch-size", "8", "--max-prefill-tokens", "64", "--rates", "20,60"]
    args += ["--seconds", "0.25", "--long-rate", "20", "--short", "[[4, 12], [2, 4]]"]
    args += ["--long", "[[40, 90], [2, 3]]", "--mixed-batches", "2,5", "--mixed-tokens", "3,64"]
    args += ["--decode-context", "8", "--reps", "2", "--commit", "abc1234"]
    report = serving_gpu.main(args)
    assert json.loads(out.read_text()) == report
    assert report["commit"] == "abc1234" and report["device"] == "cpu" and report["date"]
    assert [r["offered_rate"] for r in report["short"]] == [20.0, 60.0]
    for row in [*report["short"], report["long"]]:
        assert row["ok"] == row["requests"] > 0 and not row["errors"]
        assert row["steps"] > 0 and row["mean_batch"] >= 1 and row["mean_step_ms"] > 0
        assert row["ttft_ms"]["p50"] > 0
    for row in report["short"]:
        assert row["closed_batch_tokens_per_s"] > 0
        assert (
            row["served_over_decode"]
            == row["output_tokens_per_s"] / row["closed_batch_tokens_per_s"]
        )
    steps = report["in_process"]["mixed_steps"]
    assert [(r["batch"], r["prefill_tokens"]) for r in steps] == [(2, 3), (2, 64), (5, 3), (5, 64)]
    assert all(r["decode_ms"] > 0 and r["mixed_ms"] > 0 for r in steps)
    assert all(r["floor_ms"] is None for r in steps)  # no copy bandwidth measured on a CPU
    batches = {max(1, round(r["mean_batch"])) for r in report["short"]}
    assert {c["batch"] for c in report["in_process"]["closed_batch"]} == batches


def test_gpu_serving_saturation_is_the_highest_rate_within_the_limits() -> None:
    from benchmarks.serving_gpu import saturation

    def row(rate: float, itl: float, ttft: float) -> dict:
        return {"offered_rate": rate, "itl_ms": {"p99": itl}, "ttft_ms": {"p99": ttft}}

    curve = [row(2, 20, 300), row(4, 30, 500), row(8, 49, 1900), row(12, 80, 900)]
    assert saturation(curve) == curve[2]
    assert saturation([row(16, 51, 100), row(20, 10, 2500)]) is None
