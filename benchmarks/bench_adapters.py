"""Adapter lifecycle benchmark (issue 6): how long one Llama-7B-shaped r16 adapter takes to load,
and what a working set of adapters 4x the device budget does to time to first token.

Engine level, no gRPC: the real `Engine`, `Scheduler`, `PagePool` and `AdapterCache` run a
synthetic 7B-shaped forward (32 layers of the dense projections as bf16 matmuls, no attention,
the LoRA term of q_proj applied per segment from the resident adapter weights), so the step time
is a 7B step's and every request really waits for its adapter's copy. `--small` runs a tiny shape
on CPU to check the script; `--sim-step-ms` and `--sim-copy-ms` add the GPU's step time and
host -> device copy latency to a CPU run, so the GPU's queueing regime can be studied on a CPU.

    python -m benchmarks.bench_adapters --out adapters.json [--small --device cpu]
    python -m benchmarks.bench_adapters --out a.json --small --device cpu \
        --sim-step-ms 8 --sim-copy-ms 1.45
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models

from benchmarks.adapters_forward import MODULES, VOCAB, SyntheticForward, model_config
from benchmarks.adapters_load import load_times, simulate_copies, write_adapters
from benchmarks.timing import provenance
from shard.adapters.cache import AdapterCache
from shard.engine.engine import Engine
from shard.engine.kv_cache import PagePool
from shard.engine.sampling import SamplingParams
from shard.engine.scheduler import Scheduler
from shard.engine.sequence import EngineRequest, StepOutput, StopParams
from shard.metrics import ShardMetrics
from shard.parallel.group import SINGLE


def quantiles(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and mean of `seconds`, in ms."""
    ordered = sorted(seconds)
    return {
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "mean_ms": 1000 * statistics.fmean(ordered),
    }


def histogram_totals(engine: Engine) -> dict[str, float]:
    """Running sums and counts of the engine's step time and batch size histograms."""
    get = engine.metrics.registry.get_sample_value
    return {
        f"{name}_{part}": get(f"lorafleet_shard_{name}_{part}") or 0.0
        for name in ("step_seconds", "batch_size")
        for part in ("sum", "count")
    }


def ttft_phase(engine: Engine, adapters: list[str], n: int, rate: float, prompt_len: int) -> dict:
    """`n` requests with Poisson arrivals at `rate`/s over `adapters` (uniform): TTFT stats, and
    where each request's TTFT went: queued (arrival -> admitted into a step, which needs its
    adapter resident) and prefill (admitted -> first token), with the engine's step time and
    batch size over the phase and the reasons the cache made requests wait."""
    rng = random.Random(0)
    done = threading.Semaphore(0)
    ttfts: list[float] = []
    queued: list[float] = []
    errors: list[str] = []
    cache = engine.scheduler.adapters
    before, waits_before = histogram_totals(engine), dict(cache.waits)

    def sink(out: StepOutput) -> None:
        if out.error is not None:
            errors.append(str(out.error))
        if out.usage is not None:
            ttfts.append(out.usage.time_to_first_token_s)
            queued.append(out.usage.queue_time_s)
        if out.final:
            done.release()

    for k in range(n):
        req = EngineRequest(
            request_id=f"r{k}-{time.monotonic_ns()}",
            adapter_id=rng.choice(adapters),
            prompt_ids=tuple(rng.randrange(VOCAB) for _ in range(prompt_len)),
            sampling=SamplingParams(),
            stopping=StopParams(max_new_tokens=16, ignore_eos=True),
        )
        cache.lookup(req.adapter_id)
        engine.submit(req, sink)
        time.sleep(rng.expovariate(rate))
    for _ in range(n):
        assert done.acquire(timeout=120), "a request never finished"
    after = histogram_totals(engine)
    steps = after["step_seconds_count"] - before["step_seconds_count"]
    ttft = quantiles(ttfts)
    return {
        "requests": n,
        "distinct_adapters": len(adapters),
        "ttft_p50_ms": ttft["p50_ms"],
        "ttft_p99_ms": ttft["p99_ms"],
        "ttft_mean_ms": ttft["mean_ms"],
        "queued": quantiles(queued),
        "prefill": quantiles([t - q for t, q in zip(ttfts, queued, strict=True)]),
        "steps": steps,
        "step_mean_ms": 1000 * (after["step_seconds_sum"] - before["step_seconds_sum"]) / steps,
        "batch_mean": (after["batch_size_sum"] - before["batch_size_sum"]) / steps,
        "adapter_waits": {k: v - waits_before.get(k, 0) for k, v in cache.waits.items()},
        "errors": errors[:3],
    }


def save(result: dict, out: Path) -> None:
    """Writes what is measured so far: a later phase that hangs still leaves the earlier ones."""
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU check of the script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--budget-adapters", type=int, default=8, help="device budget, in adapters")
    p.add_argument("--working-set", type=int, default=4, help="working set / device budget")
    p.add_argument("--requests", type=int, default=150)
    p.add_argument("--rate", type=float, default=40.0, help="arrivals per second")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--lora-loop", action="store_true", help="LoRA launches per segment")
    p.add_argument("--sim-step-ms", type=float, default=0.0, help="least step time (CPU study)")
    p.add_argument("--sim-segment-ms", type=float, default=0.0, help="step time per adapter")
    p.add_argument("--sim-copy-ms", type=float, default=0.0, help="host -> device copy latency")
    p.add_argument("--commit", default=None, help="default: git rev-parse HEAD")
    p.add_argument("--command", default="")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = model_config(a.small)
    count = a.budget_adapters * a.working_set
    result: dict = {"benchmark": "adapters"} | provenance(a.command, a.commit, None, a.device)
    result |= {
        "shape": {
            "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size,
            "layers": cfg.num_layers,
            "rank": a.rank,
            "modules": list(MODULES),
            "dtype": str(dtype),
        },
        # Punica (arXiv 2310.18547): ~2 ms host -> GPU for a 7B r16 adapter over PCIe Gen4; the
        # issue's bar: TTFT with a working set 4x the device budget under 2x warm TTFT.
        "targets": {"host_to_gpu_ms_punica": 2.0, "ttft_ratio_max": 2.0},
        "device_budget_adapters": a.budget_adapters,
        "working_set_adapters": count,
        "arrival_rate_per_s": a.rate,
        "prompt_len": a.prompt_len,
        "max_new_tokens": 16,
        "lora_loop": a.lora_loop,
        "sim": {
            "step_ms": a.sim_step_ms,
            "segment_ms": a.sim_segment_ms,
            "copy_ms": a.sim_copy_ms,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        ids = write_adapters(root, cfg, count, a.rank)
        setup = {"write_adapters_s": time.perf_counter() - start}
        probe = AdapterCache(root, cfg, SINGLE, dtype, device, 2**34, 128, metrics=ShardMetrics())
        result["load"] = load_times(probe, ids, root / "weights.safetensors", repeats=20)
        probe.close()
        save(result, a.out)
        size = int(result["load"]["bytes"])
        metrics = ShardMetrics()  # the cache counts in it, the engine exports it
        cache = AdapterCache(
            root,
            cfg,
            SINGLE,
            dtype,
            device,
            a.budget_adapters * size,
            128,
            host_budget_bytes=(count + 1) * size,
            metrics=metrics,
        )
        if a.sim_copy_ms:
            simulate_copies(cache, a.sim_copy_ms / 1000)
        start = time.perf_counter()
        for adapter_id in ids:  # the working set comes from host memory in steady state
            cache.lookup(adapter_id)
        while sum(e.residency == "host" for e in cache.entries()) < count:
            time.sleep(0.05)
        setup["disk_to_host_all_s"] = time.perf_counter() - start
        result["setup"] = setup
        pool = PagePool(4096)
        scheduler = Scheduler(pool, 16, 32, 4096, cache)
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
        forward = SyntheticForward(
            cfg, cache, 4096 + 32, a.sim_step_ms / 1000, a.sim_segment_ms / 1000, a.lora_loop
        )
        engine = Engine(scheduler, forward, tok, (), 4096, 100000, metrics)
        engine.start()
        try:
            ttft_phase(engine, ids[:2], 20, a.rate, a.prompt_len)  # warm-up
            warm = ttft_phase(
                engine, ids[: a.budget_adapters // 2], a.requests, a.rate, a.prompt_len
            )
            result["warm"] = warm
            save(result, a.out)
            cold = ttft_phase(engine, ids, a.requests, a.rate, a.prompt_len)
        finally:
            engine.stop()
        result["working_set_4x"] = cold
        result["ttft_p50_ratio"] = cold["ttft_p50_ms"] / warm["ttft_p50_ms"]
        result["ttft_p99_ratio"] = cold["ttft_p99_ms"] / warm["ttft_p99_ms"]
        result["gpu_evictions"] = engine.metrics.registry.get_sample_value(
            "lorafleet_shard_adapter_evictions_total", {"tier": "gpu"}
        )
        result["engine_steps"] = engine.steps
    save(result, a.out)


if __name__ == "__main__":
    main()
