"""bench_router_stream on a short run: the router's CPU per forwarded message is measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.processes import run_benchmark


def test_short_run_reports_router_cpu_per_message(tmp_path: Path) -> None:
    out = tmp_path / "router_stream.json"
    args = ["--streams", "1,8", "--tokens", "60", "--token-delay-s", "0.002", "--out", str(out)]
    r = run_benchmark("bench_router_stream", args, out, timeout=120)
    assert r["benchmark"] == "router_stream" and r["device"] == "cpu"
    assert r["commit"] and r["date"] and r["command"].endswith(" ".join(args))
    assert [run["streams"] for run in r["runs"]] == [1, 8]
    for run in r["runs"]:
        # Every token of every stream came through the router as one message.
        assert run["messages"] == run["streams"] * 60
        assert run["router_us_per_message"] * run["messages"] == pytest.approx(
            run["router_cpu_s"] * 1e6, rel=0.01, abs=1.0
        )
        assert 0 <= run["router_core_share"] < 2
    # CPU time comes from /proc in 10 ms ticks: 480 messages take several of them.
    assert r["runs"][-1]["router_cpu_s"] > 0
