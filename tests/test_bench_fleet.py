"""bench_fleet on short runs: each mode measures what it claims, at small scale."""

from __future__ import annotations

from pathlib import Path

from tests.processes import run_benchmark


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
