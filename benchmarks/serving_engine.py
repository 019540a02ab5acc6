"""serving_gpu's in-process part: an engine built with the served shard's flags runs the
mixed-step microbenchmark (benchmarks/mixed_step.py) against the decode-only step and the step's
floor, a torch.profiler pass over one mixed case, and closed-batch decode at each rate's mean
batch."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.mixed_step import measure_mixed, start_decodes
from benchmarks.timing import copy_bandwidth


def matmul_flops(device: str) -> float | None:
    """Measured bf16 matmul throughput (8192^3), FLOP/s; None off CUDA."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) * 1e-3)


def step_floor_ms(
    params: int,
    weight_bytes: int,
    adapter_bytes: int,
    rows: int,
    prefill: int,
    layers_dim: int,
    bandwidth: float | None,
    flops: float | None,
) -> float | None:
    """max(bytes read / copy bandwidth, FLOPs / matmul throughput) of one step of `rows` rows,
    `prefill` of them one causal prompt: 2 * params per row, plus its attention's
    2 * prefill^2 * hidden per layer (`layers_dim` = layers * hidden)."""
    if bandwidth is None or flops is None:
        return None
    memory = (weight_bytes + adapter_bytes) / bandwidth
    compute = (2 * params * rows + 2 * prefill * prefill * layers_dim) / flops
    return max(memory, compute) * 1e3


def reset(engine) -> None:
    """Cancels everything the engine runs or queues (between in-process cases)."""
    for seq in [*engine.scheduler.running, *engine.scheduler.waiting]:
        engine.cancel(seq.request_id)
    engine._take_inbox(block=False)


def kernel_profile(engine, batch: int, tokens: int, vocab: int, adapters: list[str]) -> dict:
    """torch.profiler over a few mixed steps: wall time against summed kernel time per step
    and kernel launches per step (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    reset(engine)
    start_decodes(engine, batch, adapters, vocab, 256, 64)
    measure_mixed(engine, batch, tokens, 2, vocab)  # warm
    reps = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timing = measure_mixed(engine, batch, tokens, reps, vocab)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.device_time for e in kernels)
    return {
        "batch": batch,
        "prefill_tokens": tokens,
        "mixed_ms_profiled": timing.mixed_ms,
        "decode_ms_profiled": timing.decode_ms,
        "kernel_ms_per_step": kernel_us / 1e3 / (2 * reps),
        "launches_per_step": len(kernels) / (2 * reps),
    }


def in_process(args: argparse.Namespace, flags: list[str], mean_batches: list[int]) -> dict:
    """Mixed steps against decode-only steps and floors; closed-batch decode at each batch."""
    from shard.compose import build_engine
    from shard.config import parse_config
    from shard.parallel.group import SINGLE

    # The step's token budget counts the running decodes as well: one prefill of N tokens beside
    # a batch of B needs B + N to run in one step, as the microbenchmark measures it.
    budget = max(args.max_prefill_tokens, max(args.mixed_batches) + max(args.mixed_tokens))
    at = flags.index("--max-prefill-tokens") + 1
    flags = [*flags[:at], str(budget), *flags[at + 1 :]]
    engine, _, leader = build_engine(parse_config(flags, env={}), SINGLE)
    model = leader.state.runner.model
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = leader.state.model_cfg
    adapters = [*(f"a{i}" for i in range(args.adapters)), ""]
    vocab = cfg.vocab_size
    bandwidth = copy_bandwidth() if args.device == "cuda" else None
    flops = matmul_flops(args.device)
    out: dict = {
        "copy_bandwidth_tbps": bandwidth / 1e12 if bandwidth else None,
        "matmul_tflops": flops / 1e12 if flops else None,
        "mixed_steps": [],
        "closed_batch": [],
    }
    try:
        for batch in args.mixed_batches:
            reset(engine)
            start_decodes(engine, batch, adapters, vocab, args.decode_context, 8 * args.reps + 64)
            distinct = {adapters[i % len(adapters)] for i in range(batch)} - {""}
            adapter_bytes = sum(leader.state.adapters.weights(a).nbytes for a in distinct)
            for tokens in args.mixed_tokens:
                t = measure_mixed(engine, batch, tokens, args.reps, vocab)
                dims = cfg.num_layers * cfg.hidden_size
                floor = step_floor_ms(
                    params,
                    weight_bytes,
                    adapter_bytes,
                    batch + tokens,
                    tokens,
                    dims,
                    bandwidth,
                    flops,
                )
                decode_floor = step_floor_ms(
                    params, weight_bytes, adapter_bytes, batch, 0, dims, bandwidth, flops
                )
                row = {
                    "batch": batch,
                    "prefill_tokens": tokens,
                    "decode_ms": t.decode_ms,
                    "mixed_ms": t.mixed_ms,
                    "mixed_over_decode": t.mixed_ms / t.decode_ms,
                    "floor_ms": floor,
                    "mixed_over_floor": t.mixed_ms / floor if floor else None,
                    "decode_floor_ms": decode_floor,
                }
                out["mixed_steps"].append(row)
                print(json.dumps(row), flush=True)
        if args.device == "cuda" and args.profile:
            out["profile"] = kernel_profile(engine, 32, 16, vocab, adapters)
        for batch in sorted(set(mean_batches)):
            reset(engine)
            start_decodes(engine, batch, adapters, vocab, args.decode_context, 4 * args.reps + 8)
            steps = []
            for _ in range(2 * args.reps):
                start = time.perf_counter()
                engine._step()
                steps.append(time.perf_counter() - start)
            step_ms = statistics.median(steps) * 1e3
            row = {"batch": batch, "step_ms": step_ms, "tokens_per_s": batch / step_ms * 1e3}
            out["closed_batch"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        reset(engine)
        engine.scheduler.adapters.close()
    return out
