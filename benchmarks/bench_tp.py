"""Tensor parallelism on one host with 2 GPUs (issue 7), three parts in one run:

1. A Llama-2-7B-shaped shard (random bf16 weights, `--load-format dummy`) with 32 adapters of
   rank 16 on all seven projections, batch 32 with Distinct adapters: decode step time and
   tokens/s at TP=1 and TP=2. Each shard is built exactly as `lorafleet-shard --tp N` builds it
   (rank 0 in its own process, followers spawned, step plans broadcast), with the engine's CUDA
   graphs (and without, given --eager). Step time is measured twice: the engine's
   median inter-token gap (scheduling, plan broadcast, forward, sampling) and one decode forward
   through rank 0's `Leader.execute` (plan broadcast + forward) timed with CUDA events.
2. A 70B-shaped layer stack (hidden 8192, 64 heads, 8 KV heads, intermediate 28672) at TP=2, run
   SPMD by both ranks: collectives per decoder layer with and without LoRA, counted at
   `torch.distributed` and as NCCL kernels in a torch.profiler trace.
3. The tiny model (real weights from shard.tiny, float16) at TP=1 and TP=2 on GPU: greedy tokens
   of a mixed-adapter batch must be equal.

`python -m benchmarks.bench_tp --out benchmarks/results/tp_<device>x2.json`
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.bench_textgen import write_model_dir as write_shape_dir
from benchmarks.peft_baseline import write_adapters
from benchmarks.timing import provenance
from benchmarks.tp_collectives import stack_main
from benchmarks.tp_engine import EngineJob, engine_main
from benchmarks.workloads import SHAPES, Workload, make_workload
from router.local_process import free_port

SHAPE_70B = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 4,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def in_processes(
    targets: list[tuple[Callable[..., None], tuple]], timeout_s: float
) -> list[object]:
    """Runs each target in a spawned process (the last argument is a result queue); returns
    one result per process, or an error entry when a process dies or runs past the limit."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(*args, out)) for fn, args in targets]
    for p in procs:
        p.start()
    results: list[object] = []
    deadline = time.monotonic() + timeout_s
    while len(results) < len(procs) and time.monotonic() < deadline:
        try:
            results.append(out.get(timeout=1))
        except queue.Empty:
            if all(p.exitcode is not None for p in procs) and out.empty():
                break
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    while len(results) < len(procs):
        results.append({"error": f"no result (exit codes {[p.exitcode for p in procs]})"})
    return results


def shard_argv(
    model: Path, adapters: Path, tp: int, dtype: str, graphs: bool, device: str
) -> list[str]:
    argv = ["--model", str(model), "--adapters", str(adapters), "--device", device]
    argv += ["--dtype", dtype, "--tp", str(tp), "--max-batch-size", "32"]
    argv += ["--cuda-graphs", "on" if graphs else "off", "--adapter-memory-mb", "4096"]
    return [*argv, "--max-prefill-tokens", "4096", "--kv-memory-fraction", "0.5"]


# On a CPU (a smoke run of the whole benchmark) the big shapes shrink to these.
SMALL_STACK = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 512,
}


def part_decode(root: Path, args: argparse.Namespace) -> list[dict]:
    """Llama-2-7B shape, 32 adapters r=16, batch 32 Distinct: TP=1 vs TP=2 shards."""
    cuda = args.device == "cuda"
    shape = SHAPES["llama2-7b" if cuda else "tiny"]
    model, adapters = root / "decode", root / "decode-adapters"
    write_shape_dir(model, shape)
    write_adapters(model, adapters, 32, 16, args.device)
    lengths = ((args.prompt_len, args.prompt_len), (args.new_tokens, args.new_tokens))
    work = make_workload("distinct", 32, 32, 0, lengths, shape["vocab_size"])
    warm = Workload("warm", work.prompts, [4] * work.batch, work.adapters)
    dtype = "bfloat16" if cuda else "float32"
    rows = []
    for graphs in (True, False) if args.eager else (True,):
        for tp in (int(t) for t in args.tps.split(",")):
            argv = shard_argv(model, adapters, tp, dtype, graphs, args.device)
            job = EngineJob(
                (*argv, "--load-format", "dummy"),
                work,
                warm,
                args.prompt_len + args.new_tokens // 2,
            )
            (res,) = in_processes([(engine_main, (job,))], 400)
            assert isinstance(res, dict)
            res.pop("tokens", None)
            row = {"tp": tp, "cuda_graphs": graphs and cuda, "batch": 32, **res}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def part_stack(root: Path, args: argparse.Namespace) -> dict:
    """70B-shaped layers at TP=2: collectives per layer with and without LoRA."""
    cuda = args.device == "cuda"
    shape = SHAPE_70B if cuda else SMALL_STACK
    model, adapters = root / "stack", root / "stack-adapters"
    write_shape_dir(model, shape)
    write_adapters(model, adapters, 4, 16, args.device)
    argv = ["--model", str(model), "--adapters", str(adapters), "--device", args.device]
    argv += ["--dtype", "bfloat16" if cuda else "float32", "--tp", "2", "--kv-pages", "512"]
    argv += ["--load-format", "dummy", "--cuda-graphs", "off", "--max-batch-size", "32"]
    names = [f"a{i}" for i in range(4)]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        results = in_processes([(stack_main, (r, tuple(argv), names)) for r in range(2)], 300)
    finally:
        del os.environ["MASTER_PORT"]
    ranks = {}
    for res in results:
        if isinstance(res, tuple):
            ranks[f"rank{res[0]}"] = res[1]
        else:
            ranks.setdefault("errors", []).append(res)
    report = {"model": shape, "tp": 2, "decode_rows": 32, "adapters": len(names), **ranks}
    print(json.dumps(report)[:3000], flush=True)
    return report


def part_tiny(root: Path, args: argparse.Namespace) -> dict:
    """The tiny model (real weights; float16 on a GPU): greedy tokens at TP=1 and TP=2 must be
    equal."""
    from shard.tiny import write_tiny

    tiny = write_tiny(root / "tiny")
    prompts = [[11 + i, 22, 33 + 2 * i, 44, 55][: 3 + i % 3] for i in range(8)]
    ids = [*tiny.adapter_ids, ""]
    work = Workload("tiny", prompts, [24] * 8, [ids[i % len(ids)] for i in range(8)])
    warm = Workload("warm", prompts, [2] * 8, work.adapters)
    tokens = {}
    for tp in (1, 2):
        dtype = "float16" if args.device == "cuda" else "float32"  # the kernels: fp16, bf16
        argv = shard_argv(tiny.model_dir, tiny.adapters_dir, tp, dtype, True, args.device)
        job = EngineJob((*argv, "--page-size", "4"), work, warm, 0)
        (res,) = in_processes([(engine_main, (job,))], 300)
        assert isinstance(res, dict)
        tokens[f"tp{tp}"] = res.get("tokens", res.get("error"))
    report = {"equal": tokens["tp1"] == tokens["tp2"], "adapters": work.adapters, **tokens}
    print(json.dumps({"tiny_tokens_equal": report["equal"]}), flush=True)
    return report


PARTS: dict[str, Callable[[Path, argparse.Namespace], object]] = {
    "tiny": part_tiny,
    "stack": part_stack,
    "decode": part_decode,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON, rewritten after each part")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--parts", default="tiny,stack,decode")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tps", default="1,2", help="tensor-parallel sizes of the decode part")
    parser.add_argument("--eager", action="store_true", help="also decode without CUDA graphs")
    parser.add_argument("--command", default="python -m benchmarks.bench_tp")
    parser.add_argument("--commit", default=None, help="default: git rev-parse HEAD")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-tp-"))
    cuda = args.device == "cuda"
    gpus = torch.cuda.device_count() if cuda else None
    report: dict = {"benchmark": "bench_tp"}
    report |= provenance(args.command, args.commit, None, args.device, gpus)
    report |= {
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "seconds": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for part in args.parts.split(","):
        started = time.perf_counter()
        try:
            report[part] = PARTS[part](root, args)
        except Exception:
            report[part] = {"error": traceback.format_exc()[-3000:]}
            print(report[part]["error"], flush=True)
        report["seconds"][part] = round(time.perf_counter() - started, 1)
        print(f"part {part}: {report['seconds'][part]} s", flush=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
