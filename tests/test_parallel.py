"""A tensor-parallel shard (TP=2 over gloo, 2 processes) against transformers + PEFT."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
import torch

from protos import generate_pb2, generate_pb2_grpc
from router.local_process import free_port
from shard.model.sharding import input_cols, output_rows
from shard.parallel.group import TPGroup
from tests.processes import shard_args, start, stop, wait_serving
from tests.reference import greedy

NEW = 12


def test_slices_cover_every_weight_once(tiny) -> None:
    from shard.model.config import load_model_config

    cfg = load_model_config(tiny.model_dir)
    for module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        rows = [output_rows(cfg, TPGroup(r, 2), module) for r in range(2)]
        assert rows[0].stop == rows[1].start and rows[1].stop == cfg.projection_shape(module)[1]
    for module in ("o_proj", "down_proj"):
        cols = [input_cols(cfg, TPGroup(r, 2), module) for r in range(2)]
        assert cols[0].stop == cols[1].start and cols[1].stop == cfg.projection_shape(module)[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2-untied"])
def test_tp2_mixed_adapters_match_peft(tiny, tiny_family, family: str, tmp_path: Path) -> None:
    """Qwen2's q/k/v biases split with their weight rows, and its one KV head (with its biases)
    replicated on both ranks."""
    if family != "llama":
        tiny = tiny_family(family)
    port = free_port()
    proc = start(shard_args(tiny, port, "--tp", "2"), tmp_path / "shard.log")
    jobs = [(a, [11 + i, 22, 33 + i, 44]) for i, a in enumerate([*tiny.adapter_ids, ""])]
    results: dict[int, list[generate_pb2.GenerateResponse]] = {}
    try:
        wait_serving(f"127.0.0.1:{port}", proc, tmp_path / "shard.log")

        def run(i: int, adapter: str, prompt: list[int]) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                req = generate_pb2.GenerateRequest(
                    adapter_id=adapter,
                    prompt_token_ids=generate_pb2.TokenIds(ids=prompt),
                    stopping=generate_pb2.StoppingCriteria(max_new_tokens=NEW, ignore_eos=True),
                    return_logprobs=True,
                )
                results[i] = list(generate_pb2_grpc.GeneratorStub(ch).Generate(req, timeout=120))

        threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
    finally:
        assert stop(proc) == 0, (tmp_path / "shard.log").read_text()[-3000:]
    for i, (adapter, prompt) in enumerate(jobs):
        tokens = [t for m in results[i] for t in m.token_ids]
        logprobs = torch.tensor([lp for m in results[i] for lp in m.logprobs])
        adapter_dir = tiny.adapter_dir(adapter) if adapter else None
        want, logits = greedy(tiny.model_dir, adapter_dir, prompt, NEW)
        assert tokens == want, adapter
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(want)[:, None])[:, 0]
        torch.testing.assert_close(logprobs, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_bench_tp_times_a_tp2_forward_on_held_versions(tmp_path: Path) -> None:
    """bench_tp's timed forward at TP=2 (gloo, tiny shape) names the adapter versions rank 0
    claimed, which every follower holds: a plan with bare ids made the follower stop."""
    from benchmarks.bench_tp import main

    out = tmp_path / "tp.json"
    report = main(["--device", "cpu", "--parts", "decode", "--tps", "2", "--out", str(out)])
    (run,) = report["decode"]
    assert "error" not in run, run
    assert run["tp"] == 2 and run["forward_ms"] > 0 and run["tokens_per_s"] > 0


@pytest.mark.slow
def test_lora_adds_no_collective(tmp_path: Path) -> None:
    """TP=2 stack (gloo): LoRA on all seven projections changes the logits, yet every decoder
    layer makes exactly the base layer's two all-reduces (o_proj and down_proj)."""
    from benchmarks.bench_tp import main

    report = main(["--device", "cpu", "--parts", "stack", "--out", str(tmp_path / "tp.json")])
    stack = report["stack"]
    for rank in ("rank0", "rank1"):
        r = stack[rank]
        assert "error" not in r, r
        assert r["lora_changes_logits"]
        assert r["base"]["collectives_per_layer"] == [{"all_reduce": 2}] * r["layers"]
        assert r["lora"]["collectives_per_layer"] == r["base"]["collectives_per_layer"]
        assert r["lora"]["collectives_outside_layers"] == r["base"]["collectives_outside_layers"]
        assert r["lora"]["nccl_kernels"] == r["base"]["nccl_kernels"]
