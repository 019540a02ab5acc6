"""bench_engine_host end to end on a short run: every phase measured, the mixed-step cases, the
JSON header written."""

from __future__ import annotations

from pathlib import Path

from tests.processes import run_benchmark


def test_short_run_times_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "engine_host.json"
    args = ["--batches", "1,4", "--steps", "10", "--warmup", "3", "--vocab", "600"]
    args += ["--mixed", "3:20", "--mixed-layers", "2", "--mixed-reps", "2"]
    r = run_benchmark("bench_engine_host", [*args, "--out", str(out)], out, timeout=120)
    assert (r["benchmark"], r["device"]) == ("engine_host", "cpu")
    assert r["commit"] and r["date"] and r["command"]
    assert r["vocab"] == 600
    assert set(r["host_ms_per_step"]) == {"1", "4"}
    for row in r["host_ms_per_step"].values():
        for phase in ("schedule", "plan", "sample", "publish", "detokenize"):
            assert row[phase] > 0, phase
        assert 0 < row["detokenize"] <= row["advance"]  # the per-sequence loop holds it
        # `total` comes from an uninstrumented run of its own, so on a busy machine it need not
        # exceed any one phase of the instrumented run: only that it was measured is certain.
        assert row["total"] > 0 and row["mean"] > 0
    mixed = r["mixed_ms_per_step"]
    assert [(m["rows"], m["batch"], m["prefill_tokens"]) for m in mixed] == [
        ("adapters", 3, 20),
        ("base", 3, 20),
    ]
    for m in mixed:  # the forward is a part of each step
        assert 0 < m["decode_forward_ms"] < m["decode_ms"]
        assert 0 < m["mixed_forward_ms"] < m["mixed_ms"]
