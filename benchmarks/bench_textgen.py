"""Punica's text-generation experiment on one GPU, three systems in one run.

A Llama-2-7B-shaped model with random bf16 weights, N PEFT adapters of rank 16 on all seven
projections, and Punica's four adapter popularities (Distinct, Uniform, Skewed Zipf 1.5,
Identical) at several batch sizes, with prompt and output lengths drawn from a seeded
distribution:
  (a) lorafleet: the real engine (scheduler, paged KV, SGMV, CUDA graphs) built through the same
      code path as a shard, with `--load-format dummy` weights;
  (b) lorafleet with every request on the base model;
  (c) transformers + PEFT `generate` with `adapter_names` mixing the same adapter folders in one
      batch (what users do without a multi-LoRA server), and with adapters disabled.
Reports generated tokens/s, time to first token, decode step time (p50 inter-token latency, and
the decode forward alone from CUDA events) against the step's HBM floor: weights + KV read +
distinct adapters' bytes over the measured copy bandwidth. Writes JSON and a PNG plot.

`python -m benchmarks.bench_textgen --out benchmarks/results/textgen_<device>.json`
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.peft_baseline import peft_results, write_adapters
from benchmarks.timing import copy_bandwidth, provenance
from benchmarks.workloads import (
    POPULARITY,
    SHAPES,
    Lengths,
    Result,
    Workload,
    decode_step_ms,
    format_row,
    make_workload,
)
from shard.compose import build_engine
from shard.config import parse_config
from shard.engine.engine import Engine
from shard.engine.sampling import SamplingParams
from shard.engine.sequence import EngineRequest, StepOutput, StopParams
from shard.parallel.group import SINGLE
from shard.parallel.rank import RankState
from shard.tiny import write_tokenizer


class Timings:
    """Tokens of one request and when each arrived (called on the engine thread)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.done = threading.Event()
        self.error: str | None = None

    def __call__(self, out: StepOutput) -> None:
        now = time.perf_counter()
        self.tokens.extend(out.token_ids)
        self.times.extend(now for _ in out.token_ids)
        if out.error is not None:
            self.error = str(out.error)
        if out.final:
            self.done.set()


def submit_workload(engine: Engine, work: Workload, tag: str) -> tuple[list[Timings], float, float]:
    """Submits every request of the workload at once (greedy, exact output lengths) and waits
    for all: (per-request timings, start perf_counter, wall seconds)."""
    start = time.perf_counter()
    sinks = [Timings() for _ in work.prompts]
    for i, (prompt, new, adapter) in enumerate(
        zip(work.prompts, work.outputs, work.adapters, strict=True)
    ):
        req = EngineRequest(
            request_id=f"{tag}-{i}-{start}",
            adapter_id=adapter,
            prompt_ids=tuple(prompt),
            sampling=SamplingParams(),
            stopping=StopParams(max_new_tokens=new, ignore_eos=True),
        )
        engine.submit(req, sinks[i])
    for sink in sinks:
        if not sink.done.wait(600) or sink.error:
            raise RuntimeError(f"request failed: {sink.error}")
    return sinks, start, time.perf_counter() - start


def run_lorafleet(engine: Engine, work: Workload, system: str) -> Result:
    sinks, start, wall = submit_workload(engine, work, f"{system}-{work.name}")
    ttft = sorted((s.times[0] - start) * 1e3 for s in sinks)
    gaps = [b - a for s in sinks for a, b in zip(s.times, s.times[1:], strict=False)]
    step = statistics.median(gaps) * 1e3
    return Result(
        system=system,
        case=work.name,
        batch=len(work.prompts),
        tokens_per_s=sum(work.outputs) / wall,
        decode_tokens_per_s=len(work.prompts) / step * 1e3,
        step_ms=step,
        ttft_p50_ms=_pct(ttft, 50),
        ttft_p99_ms=_pct(ttft, 99),
    )


def _pct(sorted_values: list[float], p: float) -> float:
    k = min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1)))
    return sorted_values[k]


def decode_forward_ms(state: RankState, work: Workload, context: int) -> float:
    """GPU time of one decode forward (graph replay included) for the workload's rows at
    `context` tokens each, from CUDA events."""
    runner, kv = state.runner, state.kv
    for adapter in {a for a in work.adapters if a}:  # resident again if a later run evicted it
        if (err := state.adapters.preload(adapter, pin=False, timeout_s=60)) is not None:
            raise RuntimeError(f"adapter {adapter}: {err}")
    return decode_step_ms(
        kv, runner.forward, state.adapters.weights, runner.device, work.adapters, context
    )


def hbm_floor_ms(state: RankState, work: Workload, context: int, bandwidth: float) -> float:
    """Bytes one decode step must read — weights, every row's KV, each distinct adapter once —
    over the copy bandwidth (which counts read + write bytes, so reads alone go at it too)."""
    weights = sum(p.numel() * p.element_size() for p in state.runner.model.parameters())
    kv_token = 2 * state.kv.k[:, 0, 0].numel() * state.kv.k.element_size()
    kv = kv_token * context * len(work.prompts)
    adapters = sum(state.adapters.weights(a).nbytes for a in {a for a in work.adapters if a})
    return (weights + kv + adapters) / bandwidth * 1e3


def write_model_dir(model_dir: Path, shape: dict[str, int]) -> None:
    """config.json of the shape plus a tokenizer; no weights (`--load-format dummy`)."""
    from transformers import LlamaConfig

    model_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(model_dir)
    LlamaConfig(**shape, rms_norm_eps=1e-5, dtype="bfloat16").save_pretrained(model_dir)


def plot(results: list[Result], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in results})
    systems = ("lorafleet", "lorafleet-base", "peft")
    fig, axes = plt.subplots(1, len(POPULARITY), figsize=(16, 4), sharey=True)
    for ax, case in zip(axes, POPULARITY, strict=True):
        for k, system in enumerate(systems):
            by_batch = {
                r.batch: r.decode_tokens_per_s
                for r in results
                if r.system == system and (r.case == case or system == "lorafleet-base")
            }
            xs = [i + (k - 1) * 0.27 for i, b in enumerate(batches) if b in by_batch]
            ax.bar(xs, [by_batch[b] for b in batches if b in by_batch], 0.27, label=system)
        ax.set_title(case)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_yscale("log")
    axes[0].set_ylabel("decode tokens/s")
    axes[0].legend()
    fig.suptitle("Llama-2-7B shape, r=16 on all projections, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON path; the PNG goes beside")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shape", default="llama2-7b", choices=tuple(SHAPES))
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--prompt-len", default="64,256")
    parser.add_argument("--output-len", default="64,160")
    parser.add_argument("--peft-batches", default="1,8,32")
    parser.add_argument("--peft-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", choices=("on", "off"), default="on")
    parser.add_argument("--blas", choices=("cublas", "cublaslt"), default="cublaslt")
    parser.add_argument("--command", default="python -m benchmarks.bench_textgen")
    parser.add_argument("--commit", default=None, help="default: git rev-parse HEAD")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    batches = [int(b) for b in args.batches.split(",")]
    p_lo, p_hi = (int(v) for v in args.prompt_len.split(","))
    o_lo, o_hi = (int(v) for v in args.output_len.split(","))
    lengths: Lengths = ((p_lo, p_hi), (o_lo, o_hi))
    works = [
        make_workload(case, b, args.adapters, args.seed, lengths, shape["vocab_size"])
        for b in batches
        for case in POPULARITY
    ]
    cuda = args.device == "cuda"
    bandwidth = copy_bandwidth() if cuda else None
    if bandwidth:
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    root = Path(tempfile.mkdtemp(prefix="textgen-"))
    model_dir, adapter_dir = root / "model", root / "adapters"
    write_model_dir(model_dir, shape)
    write_adapters(model_dir, adapter_dir, args.adapters, 16, args.device)

    peft_batches = {int(b) for b in args.peft_batches.split(",") if b}  # "": no baseline
    peft_works = [w for w in works if w.batch in peft_batches]
    results = (
        peft_results(model_dir, adapter_dir, peft_works, args.peft_new_tokens, args.device)
        if peft_works
        else []
    )

    argv = ["--model", str(model_dir), "--adapters", str(adapter_dir), "--device", args.device]
    argv += ["--dtype", "bfloat16" if cuda else "float32", "--load-format", "dummy"]
    argv += ["--max-batch-size", str(max(batches)), "--adapter-memory-mb", "8192"]
    argv += ["--max-prefill-tokens", "8192", "--kv-memory-fraction", "0.9"]
    argv += ["--compile", args.compile, "--blas", args.blas]
    engine, _, leader = build_engine(parse_config(argv, env={}), SINGLE)
    state = leader.state
    engine.start()
    floors = []
    try:
        # Warm-up: adapters resident, kernels built. The decode graphs of every batch bucket and
        # page-table width for base and r16 rows were captured as the shard started
        # (--graph-warmup's default), so no timed step waits for a capture.
        for work in works:
            warm = Workload(work.name, work.prompts, [2] * work.batch, work.adapters)
            run_lorafleet(engine, warm, "warm")
        context = (p_lo + p_hi + o_lo + o_hi) // 2
        for work in works:
            results.append(run_lorafleet(engine, work, "lorafleet"))
            print(format_row(results[-1]), flush=True)
            if work.name == POPULARITY[0]:
                results.append(run_lorafleet(engine, work.on_base(), "lorafleet-base"))
                print(format_row(results[-1]), flush=True)
            forward = decode_forward_ms(state, work, context)
            entry = {"case": work.name, "batch": work.batch, "context": context}
            entry["forward_ms"] = forward
            if bandwidth:
                floor = hbm_floor_ms(state, work, context, bandwidth)
                entry |= {"floor_ms": floor, "forward_over_floor": forward / floor}
            floors.append(entry)
            print(f"  decode forward at context {context}: {entry}", flush=True)
    finally:
        engine.stop()

    report = {"benchmark": "bench_textgen"} | provenance(
        args.command, args.commit, bandwidth, args.device
    )
    report |= {
        "model": shape,
        "adapter_rank": 16,
        "compile": args.compile,
        "blas": args.blas,
        "adapters": args.adapters,
        "lengths": {"prompt": [p_lo, p_hi], "output": [o_lo, o_hi]},
        "kv_pages": state.kv.pool.total,
        "results": [asdict(r) for r in results],
        "decode_forward": floors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    plot(results, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
