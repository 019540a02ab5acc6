"""bench_fleet on short runs: each mode measures what it claims, at small scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.processes import run_benchmark

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_placement_index_agrees_with_the_scan_and_reports_its_cost(tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    args = ["--placement", "--shards", "40,300", "--requests", "400", "--compare-rule"]
    r = run_benchmark("bench_fleet", [*args, "--out", str(out)], out, timeout=120)
    assert r["benchmark"] == "fleet_placement" and r["machine_name"] == "2-core CPU VM"
    assert r["commit"] and r["date"] and r["command"].endswith(" ".join([*args, "--out", str(out)]))
    assert [run["shards"] for run in r["runs"]] == [40, 300]
    for run in r["runs"]:
        # Steady state reached, every request placed exactly where the pure rule puts it.
        assert run["slots_taken"] >= 0.69 and run["unplaced"] == 0
        assert run["rule_disagreements"] == 0
        assert 0 < run["place_us"]["p50"] <= run["placement_us"]["p50"]


def test_simulation_consolidates_where_least_loaded_spreads(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    args = ["--simulate", "--shards", "8", "--duration-s", "60", "--peak-rate", "60"]
    r = run_benchmark("bench_fleet", [*args, "--out", str(out)], out, timeout=120)
    assert r["benchmark"] == "fleet_sim" and r["fleet"]["shards"] == 8
    consolidate, spread = r["policies"]["consolidate"], r["policies"]["least-loaded"]
    for run in (consolidate, spread):
        assert sum(run["gpu_time_share"].values()) == pytest.approx(1.0, abs=1e-3)
        # Nearly every request that arrived finished within the run (the ramp ends at 0/s).
        assert 0.97 * run["arrivals"] <= run["completed"] <= run["arrivals"]
    assert consolidate["arrivals"] == spread["arrivals"]  # the same seeded traffic
    assert consolidate["gpu_time_share"]["idle"] > 2 * spread["gpu_time_share"]["idle"]
    assert consolidate["mean_batch_when_busy"] > 1.5 * spread["mean_batch_when_busy"]
    assert r["plot"] is None or Path(r["plot"]).stat().st_size > 10_000


def test_simulation_queues_through_the_routers_admission() -> None:
    from benchmarks.fleet_model import Fleet
    from benchmarks.fleet_sim import Simulation
    from router.admission import Admission
    from router.config import Policy

    # Two shards of 32 slots against ~100 arrivals a second at the peak: the queue fills.
    sim = Simulation(
        Fleet(shards=2, duration_s=20, peak_rate=200, queue_size=40), Policy.CONSOLIDATE
    )
    assert isinstance(sim.admission, Admission)
    r = sim.run()
    assert r["rejected_queue_full"] > 0 and r["max_router_queue"] == 40
    assert r["completed"] + r["rejected_queue_full"] <= r["arrivals"]


def test_step_model_reproduces_the_measured_decode_steps() -> None:
    from benchmarks.fleet_model import StepModel

    measured = json.loads((RESULTS / "textgen_h200.json").read_text())["decode_forward"]
    model = StepModel()
    for row in measured:
        if row["case"] in ("distinct", "identical"):
            distinct = row["batch"] if row["case"] == "distinct" else 1
            fitted = model.step_s(row["batch"], distinct) * 1000
            assert fitted == pytest.approx(row["forward_ms"], rel=0.05), row


def test_tracking_measures_a_real_router_holding_simulated_shards(tmp_path: Path) -> None:
    out = tmp_path / "tracking.json"
    args = ["--tracking", "--shards", "12", "--changes-per-s", "4", "--window-s", "3"]
    r = run_benchmark("bench_fleet", [*args, "--out", str(out)], out, timeout=180)
    (run,) = r["runs"]
    assert run["shards"] == 12 and run["shards_eligible_at_end"] == 12
    # Heartbeats alone are 12 a second; changes at 4/s per shard add more.
    assert run["snapshots_per_s"] > 12
    assert run["router_us_per_snapshot"] * run["snapshots"] == pytest.approx(
        run["router_cpu_s"] * 1e6, rel=0.05, abs=20_000
    )


def test_streams_all_complete_through_one_router(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    args = ["--streams", "60", "--tokens", "2", "--token-delay-s", "1.5", "--fakes", "2"]
    r = run_benchmark("bench_fleet", [*args, "--out", str(out)], out, timeout=180)
    assert r["benchmark"] == "fleet_streams" and r["failed"] == 0
    # Every stream was open at once and every token came through (one message per token).
    assert r["peak_concurrent_streams"] == 60 and r["messages"] == 120
    assert r["router_us_per_stream_setup"] > 0 and r["router_rss_peak_mib"] > 0
