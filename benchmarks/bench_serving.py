"""Open-loop serving benchmark: Poisson arrivals, Zipf adapter popularity, seeded lengths.

Requests are sent at their scheduled times whether or not earlier ones finished (open loop), so
queueing shows up in the latencies instead of slowing the sender down. Reports throughput and
time to first token (TTFT), inter-token latency (ITL) and end-to-end latency percentiles.

    python -m benchmarks.bench_serving --target HOST:PORT --rate 20 --requests 500 --out r.json

With `--spawn-tiny` it starts its own shard (the tiny random model on CPU), a router and a bare
passthrough proxy (the control, benchmarks/passthrough_proxy.py) on grpc.aio and one on grpc's
sync server, runs the load with its requests dealt in turn straight to the shard and through each
proxy (so all of them see the same shard at the same time), and reports the latency each adds:

    python -m benchmarks.bench_serving --spawn-tiny --out benchmarks/results/serving_cpu.json

Statistics (percentiles, summaries, bootstrap intervals) live in benchmarks/serving_stats.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from benchmarks.serving_procs import Pins, Spawned, cpu_seconds, machine, spawn_tiny
from benchmarks.serving_stats import (
    Outcome,
    open_loop_report,
    spread_ms,
    summarize,
)
from benchmarks.timing import provenance
from protos import generate_pb2, generate_pb2_grpc

# What --spawn-tiny measures: 1-token requests in pairs, and the open loop.
MODES = ("paired", "open-loop")


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """The load: how many requests, how fast, over which adapters, how long each."""

    requests: int
    rate: float  # mean arrivals per second (Poisson process)
    adapters: tuple[str, ...]  # in popularity order; "" is the base model
    zipf_s: float  # popularity of the k-th adapter is proportional to 1 / k**zipf_s
    prompt_tokens: tuple[int, int]  # inclusive range, uniform
    output_tokens: tuple[int, int]  # inclusive range, uniform
    vocab_size: int
    seed: int
    # Tokens every prompt starts with (a system prompt shared by all requests and adapters),
    # before its own `prompt_tokens`; 0: none. Run the shard with --prefix-cache on and off
    # to see what the prefix cache saves of the time to first token.
    shared_prefix_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Arrival:
    at_s: float  # seconds after the start
    adapter_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


def make_workload(spec: LoadSpec) -> list[Arrival]:
    """The requests and their send times; the same spec always gives the same workload."""
    rng = random.Random(spec.seed)
    weights = [1.0 / (k**spec.zipf_s) for k in range(1, len(spec.adapters) + 1)]
    # Token ids 0..2 are the tiny tokenizer's specials; stay clear of them in any vocabulary.
    low_id = min(3, spec.vocab_size - 1)
    # From its own generator, so that the rest of a seeded workload does not change with it.
    shared = random.Random(f"shared-prefix-{spec.seed}")
    prefix = tuple(
        shared.randrange(low_id, spec.vocab_size) for _ in range(spec.shared_prefix_tokens)
    )
    at, arrivals = 0.0, []
    for _ in range(spec.requests):
        at += rng.expovariate(spec.rate)
        length = rng.randint(*spec.prompt_tokens)
        arrivals.append(
            Arrival(
                at_s=at,
                adapter_id=rng.choices(spec.adapters, weights)[0],
                prompt_ids=prefix
                + tuple(rng.randrange(low_id, spec.vocab_size) for _ in range(length)),
                max_new_tokens=rng.randint(*spec.output_tokens),
            )
        )
    return arrivals


def _request(arrival: Arrival) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        adapter_id=arrival.adapter_id,
        prompt_token_ids=generate_pb2.TokenIds(ids=arrival.prompt_ids),
        stopping=generate_pb2.StoppingCriteria(
            max_new_tokens=arrival.max_new_tokens, ignore_eos=True
        ),
    )


async def _one(
    stub: generate_pb2_grpc.GeneratorStub, arrival: Arrival, start: float, timeout_s: float
) -> Outcome:
    sent = time.perf_counter()
    outcome = Outcome(arrival.adapter_id, sent - start, arrival.at_s)
    try:
        async for message in stub.Generate(_request(arrival), timeout=timeout_s):
            now = time.perf_counter() - sent
            outcome.token_times.extend(now for _ in message.token_ids)
    except grpc.aio.AioRpcError as err:
        outcome.error = err.code().name
    outcome.end_s = time.perf_counter() - sent
    return outcome


async def run_load(
    target: str, workload: Sequence[Arrival], timeout_s: float = 120.0
) -> tuple[list[Outcome], float]:
    """Sends every request at its time over one channel; returns the outcomes and the duration."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()
        tasks = []
        for arrival in workload:
            await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(stub, arrival, start, timeout_s)))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.perf_counter() - start


def _target_info(target: str) -> tuple[tuple[str, ...], int]:
    """Adapters (sorted, base model last) and vocabulary size, asked of the target."""
    with grpc.insecure_channel(target) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        info = stub.GetInfo(generate_pb2.GetInfoRequest(), timeout=10)
        listed = stub.ListAdapters(generate_pb2.ListAdaptersRequest(), timeout=10)
    return (*sorted({a.adapter_id for a in listed.adapters}), ""), info.vocab_size


async def run_interleaved(
    targets: Sequence[str], workload: Sequence[Arrival], shift: int, timeout_s: float = 120.0
) -> tuple[dict[str, list[Outcome]], float]:
    """Sends every request at its time, request i to `targets[(i + shift) % len(targets)]`: the
    arms share one load on the shard behind them, at the same moments. Returns each target's
    outcomes and the duration of the whole run."""
    channels = [grpc.aio.insecure_channel(target) for target in targets]
    try:
        stubs = [generate_pb2_grpc.GeneratorStub(ch) for ch in channels]
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
        start = time.perf_counter()
        arms, tasks = [], []
        for i, arrival in enumerate(workload):
            await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
            arm = (i + shift) % len(targets)
            arms.append(arm)
            tasks.append(asyncio.create_task(_one(stubs[arm], arrival, start, timeout_s)))
        outcomes = await asyncio.gather(*tasks)
        split: dict[str, list[Outcome]] = {target: [] for target in targets}
        for arm, outcome in zip(arms, outcomes, strict=True):
            split[targets[arm]].append(outcome)
        return split, time.perf_counter() - start
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


def compare(
    targets: Sequence[str], workload: list[Arrival], repeats: int
) -> tuple[dict[str, list[Outcome]], float]:
    """Runs the workload `repeats` times interleaved over the targets, rotating which requests
    each target gets from run to run (so each request's length and adapter weigh on every arm);
    returns each target's pooled outcomes and the total duration. Each of n arms carries 1/n
    of the load: its throughput is that share of the shard's."""
    pooled: dict[str, list[Outcome]] = {target: [] for target in targets}
    duration = 0.0
    for repeat in range(repeats):
        split, seconds = asyncio.run(run_interleaved(targets, workload, shift=repeat))
        for target, outcomes in split.items():
            pooled[target] += outcomes
        duration += seconds
    return pooled, duration


async def _paired(
    shard: str, proxy: str, proxy_pid: int, arrival: Arrival, count: int
) -> tuple[list[float], float]:
    """`count` pairs of TTFTs (direct, then proxied) and the proxy's CPU seconds meanwhile."""
    async with (
        grpc.aio.insecure_channel(shard) as direct,
        grpc.aio.insecure_channel(proxy) as routed,
    ):
        stubs = [generate_pb2_grpc.GeneratorStub(ch) for ch in (direct, routed)]
        for stub in stubs:
            await _one(stub, arrival, time.perf_counter(), 30.0)  # connects
        pairs: list[float] = []
        before = cpu_seconds(proxy_pid)
        for _ in range(count):
            for stub in stubs:
                outcome = await _one(stub, arrival, time.perf_counter(), 30.0)
                if outcome.error is not None:
                    raise RuntimeError(outcome.error)
                pairs.append(outcome.token_times[0])
        return pairs, cpu_seconds(proxy_pid) - before


def hop_cost(shard: str, proxy: str, proxy_pid: int, adapter_id: str, count: int) -> dict:
    """1-token requests one at a time, alternating straight to the shard and through a proxy.

    The median of the paired differences is the proxy's added TTFT; pairing keeps drifts in the
    machine's load out of it. The proxy's CPU time per request bounds the added latency from
    above where the proxy has a core to itself.
    """
    arrival = Arrival(0.0, adapter_id, (5, 6, 7, 8), 1)
    ttfts, proxy_cpu_s = asyncio.run(_paired(shard, proxy, proxy_pid, arrival, count))
    direct, proxied = ttfts[0::2], ttfts[1::2]
    added = [p - d for d, p in zip(direct, proxied, strict=True)]
    return {
        "pairs": count,
        "ttft_ms_direct": spread_ms(direct),
        "ttft_ms_proxied": spread_ms(proxied),
        "added_ttft_ms": spread_ms(added),
        # The router's includes the load snapshots it handles meanwhile.
        "proxy_cpu_ms_per_request": round(proxy_cpu_s / count * 1000, 3),
    }


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a router or shard")
    where.add_argument("--spawn-tiny", action="store_true", help="start a tiny shard + router")
    parser.add_argument("--rate", type=float, default=10.0, help="mean requests per second")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--adapters", default=None, help="comma list (default: ListAdapters)")
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--prompt-tokens", type=_range, default=(8, 64), metavar="MIN:MAX")
    parser.add_argument("--output-tokens", type=_range, default=(16, 64), metavar="MIN:MAX")
    parser.add_argument(
        "--shared-prefix-tokens",
        type=int,
        default=0,
        help="tokens of a system prompt every request starts with, before its own",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="--spawn-tiny: interleaved runs")
    parser.add_argument("--max-batch-size", type=int, default=32, help="--spawn-tiny: shard's")
    parser.add_argument("--pairs", type=int, default=300, help="--spawn-tiny: 1-token pairs")
    parser.add_argument(
        "--modes",
        default="paired,open-loop",
        type=lambda text: frozenset(text.split(",")),
        help=f"--spawn-tiny: comma list of {' and '.join(MODES)}",
    )
    for name in ("shard", "router", "passthrough", "threaded"):
        parser.add_argument(f"--{name}-cpus", help=f"--spawn-tiny: taskset CPU list of the {name}")
    parser.add_argument("--commit", default=None, help="default: git rev-parse HEAD")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    command = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(command)
    if unknown := args.modes.difference(MODES):
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))} (know {', '.join(MODES)})")
    # Others' work on the machine skews every latency here: record the load before and after.
    load_before = round(os.getloadavg()[0], 2)

    with _targets(args) as (target, load_spec):
        workload = make_workload(load_spec)
        if isinstance(target, str):
            outcomes, duration = asyncio.run(run_load(target, workload))
            results = {"target": summarize(outcomes, duration)}
        else:
            results = _spawned_results(target, load_spec, workload, args)
    report = {
        "benchmark": "serving",
        "machine": {**machine(), "load_average_1m_before": load_before},
    }
    # --spawn-tiny serves from this host's CPUs; a --target's device is not known here.
    invocation = shlex.join(["python", "-m", "benchmarks.bench_serving", *command])
    report |= provenance(invocation, args.commit, None, "cpu" if args.spawn_tiny else None)
    report |= {
        "load": {**asdict(load_spec), "repeats": args.repeats if args.spawn_tiny else 1},
        "pinning": asdict(_pins(args)),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


def _spawned_results(
    target: Spawned, spec: LoadSpec, workload: list[Arrival], args: argparse.Namespace
) -> dict:
    """The 1-token pairs per proxy (on the most popular adapter) and the open loop straight to
    the shard vs through each proxy, as --modes asks."""
    results: dict[str, dict] = {}
    if MODES[0] in args.modes:
        proxies = {
            "router": (target.router, target.router_pid),
            "passthrough_proxy": (target.passthrough, target.passthrough_pid),
            "threaded_passthrough": (target.threaded, target.threaded_pid),
        }
        results["sequential_1_token"] = {
            name: hop_cost(target.shard, *proxy, spec.adapters[0], args.pairs)
            for name, proxy in proxies.items()
        }
    if MODES[1] in args.modes:
        arms = {
            "shard_direct": target.shard,
            "through_router": target.router,
            "through_passthrough": target.passthrough,
            "through_threaded": target.threaded,
        }
        pooled, duration = compare(list(arms.values()), workload, args.repeats)
        results["open_loop"] = open_loop_report(
            {name: pooled[address] for name, address in arms.items()}, duration
        )
    return results


def _pins(args: argparse.Namespace) -> Pins:
    return Pins(args.shard_cpus, args.router_cpus, args.passthrough_cpus, args.threaded_cpus)


@contextmanager
def _targets(args: argparse.Namespace) -> Iterator[tuple[str | Spawned, LoadSpec]]:
    """The target to load (an address, or spawned processes) and the load spec."""
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        if args.spawn_tiny:
            with spawn_tiny(Path(tmp), args.max_batch_size, _pins(args)) as spawned:
                yield spawned, _spec(args, spawned.shard)
        else:
            yield args.target, _spec(args, args.target)


def _spec(args: argparse.Namespace, target: str) -> LoadSpec:
    listed, vocab_size = _target_info(target)
    adapters = tuple(args.adapters.split(",")) if args.adapters is not None else listed
    spec = LoadSpec(
        requests=args.requests,
        rate=args.rate,
        adapters=adapters,
        zipf_s=args.zipf_s,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        vocab_size=vocab_size,
        seed=args.seed,
        shared_prefix_tokens=args.shared_prefix_tokens,
    )
    # Loads every adapter once, so the first requests do not time adapter loading from disk.
    warm = [Arrival(0.0, a, (5, 6, 7), 2) for a in spec.adapters]
    asyncio.run(run_load(target, warm))
    return spec


if __name__ == "__main__":
    main()
