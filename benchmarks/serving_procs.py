"""The processes `bench_serving --spawn-tiny` measures: a tiny-model CPU shard, a router and a
bare passthrough proxy in front of it, each optionally pinned to its own CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos import generate_pb2, generate_pb2_grpc
from router.local_process import free_port, wait_serving

REPO = Path(__file__).resolve().parent.parent


def require_serving(address: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Returns once `proc` serves at `address`; raises RuntimeError if it exits or times out."""
    if (why := wait_serving(address, proc, timeout_s)) is not None:
        raise RuntimeError(why)


def wait_placing(router: str) -> None:
    """Returns once the router lists a shard: it places only after a shard's first snapshot."""
    with grpc.insecure_channel(router) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        while not stub.GetInfo(generate_pb2.GetInfoRequest(), timeout=10).shards:
            time.sleep(0.1)


@dataclass(frozen=True, slots=True)
class Spawned:
    """Addresses of the spawned shard and proxies, and the proxies' process ids."""

    shard: str
    router: str
    router_pid: int
    # benchmarks.passthrough_proxy: a bare forwarder, the control for the router.
    passthrough: str
    passthrough_pid: int


@dataclass(frozen=True, slots=True)
class Pins:
    """CPU lists (taskset syntax, e.g. "4-7") for each spawned process; None leaves it unpinned.

    On a many-core host, disjoint lists keep the client, router and shard from taking each
    other's cores, so the router's added latency is its own and not a fight for a core.
    """

    shard: str | None = None
    router: str | None = None
    passthrough: str | None = None


def pinned(cpus: str | None, command: list[str]) -> list[str]:
    """`command` under `taskset -c cpus`, or as it is for None."""
    return ["taskset", "-c", cpus, *command] if cpus else command


@contextmanager
def spawn_tiny(workdir: Path, max_batch_size: int, pins: Pins = Pins()) -> Iterator[Spawned]:
    """A tiny-model CPU shard, and a router and a passthrough proxy in front of it."""
    from shard.tiny import write_tiny

    tiny = write_tiny(workdir / "tiny")
    shard_port, router_port = free_port(), free_port()
    # One torch thread: on a small machine the shard's parallel matmuls otherwise stall whenever
    # the router or the client takes a core, which would be charged to the router.
    env = {**os.environ, "LORAFLEET_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1"}
    common = {"cwd": REPO, "env": env, "stderr": subprocess.STDOUT}
    procs: list[subprocess.Popen] = []
    try:
        shard_args = ["--model", tiny.model_dir, "--adapters", tiny.adapters_dir]
        shard_args += ["--host", "127.0.0.1", "--port", shard_port, "--device", "cpu"]
        shard_args += ["--max-batch-size", max_batch_size, "--kv-pages", "4096"]
        with open(workdir / "shard.log", "w") as log:
            shard_cmd = [sys.executable, "-m", "shard", *map(str, shard_args)]
            procs.append(subprocess.Popen(pinned(pins.shard, shard_cmd), stdout=log, **common))
        shard = f"127.0.0.1:{shard_port}"
        require_serving(shard, procs[0])
        router_args = ["--host", "127.0.0.1", "--port", str(router_port), "--shard", shard]
        with open(workdir / "router.log", "w") as log:
            router_cmd = [sys.executable, "-m", "router", *router_args]
            procs.append(subprocess.Popen(pinned(pins.router, router_cmd), stdout=log, **common))
        router = f"127.0.0.1:{router_port}"
        require_serving(router, procs[1])
        wait_placing(router)
        passthrough_port = free_port()
        with open(workdir / "passthrough.log", "w") as log:
            module = ["-m", "benchmarks.passthrough_proxy", "--shard", shard]
            command = [sys.executable, *module, "--port", str(passthrough_port)]
            procs.append(subprocess.Popen(pinned(pins.passthrough, command), stdout=log, **common))
        passthrough = f"127.0.0.1:{passthrough_port}"
        require_serving(passthrough, procs[2])
        yield Spawned(shard, router, procs[1].pid, passthrough, procs[2].pid)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
