"""bench_adapters' CPU path (`--small`): what the GPU run relies on works end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.processes import run_benchmark

pytestmark = pytest.mark.slow


def test_small_run_measures_loads_and_both_ttft_phases(tmp_path: Path) -> None:
    out = tmp_path / "adapters.json"
    args = ["--small", "--device", "cpu", "--out", str(out), "--requests", "40"]
    args += ["--budget-adapters", "4", "--prompt-len", "32"]
    r = run_benchmark("bench_adapters", args, out, timeout=240)
    assert (r["benchmark"], r["device"]) == ("adapters", "cpu")
    assert r["commit"] and r["torch"] and r["date"]  # the shared header (benchmarks.timing)
    assert r["working_set_adapters"] == 16
    assert r["load"]["bytes"] > 0
    assert r["load"]["cold"]["disk_to_host_s"] > 0 and r["load"]["page_cache"]["disk_to_gpu_s"] > 0
    for phase in ("warm", "working_set_4x"):
        assert r[phase]["requests"] == 40 and r[phase]["errors"] == []
        assert 0 < r[phase]["ttft_p50_ms"] <= r[phase]["ttft_p99_ms"]
    # The working set really cycled through the device budget.
    assert r["gpu_evictions"] > 0
