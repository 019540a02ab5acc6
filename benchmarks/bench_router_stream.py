"""Router CPU per streamed token message, against concurrent streams: sizing router replicas.

    python -m benchmarks.bench_router_stream --streams 1,8,32 --out router_stream.json

A router forwards every token message of every stream, so its cost grows with tokens per second,
not requests: each message is read from the shard's call and written to the client's, in
grpc.aio. This starts the test suite's fake shard (`tests/fake_shard.py`: no model, tokens on a
timer, `--token-delay-s` apart, so the router sees a GPU shard's message pattern without one)
and a router in front of it, runs N concurrent streams through the router, and reports the
router's CPU time per forwarded message and the share of a core it used (CPU time from /proc,
in 10 ms ticks: runs of a few hundred messages or more). Optional pinning
(`--router-cpus`, `--shard-cpus`) keeps the client and the fake off the router's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from benchmarks.serving_procs import cpu_seconds, fake_fleet, machine
from benchmarks.timing import provenance
from protos import generate_pb2, generate_pb2_grpc


@dataclass(frozen=True, slots=True)
class StreamLoad:
    """What one run measured."""

    streams: int
    messages: int  # token messages the client received
    seconds: float
    router_cpu_s: float

    @property
    def router_us_per_message(self) -> float:
        return self.router_cpu_s / self.messages * 1e6

    @property
    def router_core_share(self) -> float:
        return self.router_cpu_s / self.seconds


async def _stream(stub: generate_pb2_grpc.GeneratorStub, prompt: str, tokens: int) -> int:
    request = generate_pb2.GenerateRequest(
        adapter_id="a",
        prompt=prompt,
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=tokens, ignore_eos=True),
    )
    messages = 0
    async for _ in stub.Generate(request, timeout=120):
        messages += 1
    return messages


async def run_streams(router: str, router_pid: int, streams: int, tokens: int) -> StreamLoad:
    """`streams` concurrent requests of `tokens` tokens each through the router."""
    async with grpc.aio.insecure_channel(router) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        await _stream(stub, "warm-up", 2)
        cpu, start = cpu_seconds(router_pid), time.perf_counter()
        counts = await asyncio.gather(*(_stream(stub, f"p{i}", tokens) for i in range(streams)))
        seconds = time.perf_counter() - start
        return StreamLoad(streams, sum(counts), seconds, cpu_seconds(router_pid) - cpu)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="1,8,32", help="comma list of concurrent streams")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument("--token-delay-s", type=float, default=0.006, help="the fake's step")
    parser.add_argument("--router-cpus", default=None, help="taskset CPU list of the router")
    parser.add_argument("--shard-cpus", default=None, help="taskset CPU list of the fake shard")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--commit", default=None, help="default: git rev-parse HEAD")
    command = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(command)
    runs = []
    with (
        tempfile.TemporaryDirectory(prefix="router-stream-") as tmp,
        fake_fleet(Path(tmp), args.token_delay_s, args.router_cpus, args.shard_cpus) as fleet,
    ):
        for streams in (int(s) for s in args.streams.split(",")):
            load = asyncio.run(run_streams(*fleet, streams, args.tokens))
            runs.append(load)
            print(
                f"{streams:4d} streams: {load.messages} messages in {load.seconds:.2f} s, "
                f"router {load.router_us_per_message:.0f} us CPU per message, "
                f"{load.router_core_share:.0%} of a core",
                flush=True,
            )
    invocation = shlex.join(["python", "-m", "benchmarks.bench_router_stream", *command])
    report = {"benchmark": "router_stream", "machine": machine()}
    report |= provenance(invocation, args.commit, None, "cpu")
    report |= {
        "tokens_per_stream": args.tokens,
        "token_delay_s": args.token_delay_s,
        "pinning": {"router": args.router_cpus, "shard": args.shard_cpus},
        "runs": [
            asdict(r)
            | {
                "router_us_per_message": round(r.router_us_per_message, 1),
                "router_core_share": round(r.router_core_share, 3),
            }
            for r in runs
        ],
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
