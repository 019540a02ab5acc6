"""One tensor-parallel shard process of the TP benchmark: rank 0 of `--tp N` built exactly as
`lorafleet-shard` builds it, running a workload through the engine, and one decode forward timed
through rank 0's `Leader.execute`."""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import statistics
import time
import traceback
from dataclasses import dataclass

import torch

from benchmarks.bench_textgen import submit_workload
from benchmarks.workloads import Workload, decode_step_ms
from shard.adapters.tiers import Resident
from shard.config import parse_config


@dataclass(frozen=True, slots=True)
class EngineJob:
    """What one shard process (rank 0; followers spawned) does."""

    argv: tuple[str, ...]
    work: Workload
    warm: Workload
    context: int  # of the timed decode forward; 0: no timing


def run_work(engine, work: Workload, tag: str) -> dict:
    """Submits the whole workload at once and waits; tokens, tokens/s and step time."""
    sinks, _, wall = submit_workload(engine, work, tag)
    gaps = [b - a for s in sinks for a, b in zip(s.times, s.times[1:], strict=False)]
    step = statistics.median(gaps)
    return {
        "tokens": [s.tokens for s in sinks],
        "tokens_per_s": sum(work.outputs) / wall,
        "step_ms_p50": step * 1e3,
        "decode_tokens_per_s": len(work.prompts) / step,
    }


def engine_main(job: EngineJob, out: mp.Queue) -> None:
    """A shard process: rank 0 of `--tp N`, exactly as `lorafleet-shard` builds it. The result
    goes out before the group is torn down; Python stacks are dumped if it runs past 150 s."""
    from shard.compose import build_engine, follower_main, rank_device
    from shard.parallel.group import TPGroup, init_group
    from shard.parallel.shutdown import shutdown_group
    from shard.parallel.spawn import spawn_followers

    faulthandler.dump_traceback_later(150, exit=False)
    started = time.perf_counter()

    def progress(what: str) -> None:
        print(f"bench_tp engine: {what} at {time.perf_counter() - started:.1f} s", flush=True)

    try:
        cfg = parse_config(list(job.argv), env={})
        torch.set_grad_enabled(False)
        followers = spawn_followers(cfg, follower_main)
        group = init_group(0, cfg.tp, rank_device(cfg, TPGroup(0, cfg.tp)), cfg.tp_timeout_s)
        engine, _, leader = build_engine(cfg, group)
        engine.start()
        progress(f"ready (tp={cfg.tp})")
        try:
            run_work(engine, job.warm, "warm")
            progress("warm-up done")
            result = run_work(engine, job.work, "run")
            progress("run done")
            if job.context:
                result["forward_ms"] = leader_forward_ms(leader, job.work, job.context)
                progress("forward timed")
            result["kv_pages"] = leader.state.kv.pool.total
            out.put(result)
        finally:
            engine.stop()
            shutdown_group(leader.channel, followers)
            progress("group shut down")
    except BaseException:
        out.put({"error": traceback.format_exc()[-3000:]})


def leader_forward_ms(leader, work: Workload, context: int) -> float:
    """Median time of one decode step through rank 0's Leader.execute (plan broadcast to the
    followers + forward, graph replay when captured). Its rows name the adapter versions rank 0
    claims as the engine does (`id@version`, held by every follower), released afterwards."""
    cache = leader.state.adapters
    deadline = time.monotonic() + 120
    claimed = {a: cache.wait_resident(a, deadline, claim=True) for a in set(work.adapters) if a}
    failed = {a: s for a, s in claimed.items() if not isinstance(s, Resident)}
    if failed:
        raise RuntimeError(f"adapters not resident for the timed forward: {failed}")
    keys = [claimed[a].key if a else "" for a in work.adapters]
    device = leader.state.runner.device
    try:
        return decode_step_ms(
            leader.state.kv, leader.execute, cache.weights, device, keys, context, reps=30
        )
    finally:
        for state in claimed.values():
            cache.release(state.key)
