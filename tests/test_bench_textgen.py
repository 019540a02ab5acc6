"""The text-generation benchmark's whole pipeline on CPU with a tiny shape (numbers are not
checked here, only that every system ran every case and the report is complete)."""

from __future__ import annotations

import json

from benchmarks.bench_textgen import main
from benchmarks.workloads import POPULARITY


def test_bench_textgen_smoke(tmp_path) -> None:
    out = tmp_path / "textgen.json"
    argv = ["--out", str(out), "--device", "cpu", "--shape", "tiny", "--batches", "1,4"]
    argv += ["--adapters", "4", "--prompt-len", "3,6", "--output-len", "3,5"]
    argv += ["--peft-batches", "4", "--peft-new-tokens", "2"]
    report = main(argv)
    assert json.loads(out.read_text()) == report
    runs = {(r["system"], r["case"], r["batch"]) for r in report["results"]}
    for case in POPULARITY:
        assert {("lorafleet", case, 1), ("lorafleet", case, 4), ("peft", case, 4)} <= runs
    assert {("lorafleet-base", "distinct", 4), ("hf-base", "distinct", 4)} <= runs
    for r in report["results"]:
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["ttft_p50_ms"] > 0
    assert len(report["decode_forward"]) == 2 * len(POPULARITY)
    assert report["kv_pages"] > 0
