"""The processes `bench_serving --spawn-tiny` measures: a tiny-model CPU shard, a router and two
bare passthrough proxies (grpc.aio and thread-based) in front of it, each optionally pinned to its
own CPUs."""

from __future__ import annotations

import os
import platform
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
    # The same on grpc's sync server (--threads): what a thread-based router's hop would cost.
    threaded: str
    threaded_pid: int


@dataclass(frozen=True, slots=True)
class Pins:
    """CPU lists (taskset syntax, e.g. "4-7") for each spawned process; None leaves it unpinned.

    On a many-core host, disjoint lists keep the client, router and shard from taking each
    other's cores, so the router's added latency is its own and not a fight for a core.
    """

    shard: str | None = None
    router: str | None = None
    passthrough: str | None = None
    threaded: str | None = None


def pinned(cpus: str | None, command: list[str]) -> list[str]:
    """`command` under `taskset -c cpus`, or as it is for None."""
    return ["taskset", "-c", cpus, *command] if cpus else command


def launch(
    procs: list[subprocess.Popen],
    workdir: Path,
    name: str,
    cpus: str | None,
    command: list[str],
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Starts `command` (pinned to `cpus`) from the repository root, its output in
    `workdir/<name>.log`, and appends it to `procs`, which the caller stops."""
    with open(workdir / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            pinned(cpus, command), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    procs.append(proc)
    return proc


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        proc.terminate()
        proc.wait(30)


@contextmanager
def spawn_tiny(workdir: Path, max_batch_size: int, pins: Pins = Pins()) -> Iterator[Spawned]:
    """A tiny-model CPU shard, and a router and the two passthrough proxies in front of it."""
    from shard.tiny import write_tiny

    tiny = write_tiny(workdir / "tiny")
    shard_port, router_port = free_port(), free_port()
    # One torch thread: on a small machine the shard's parallel matmuls otherwise stall whenever
    # the router or the client takes a core, which would be charged to the router.
    env = {**os.environ, "LORAFLEET_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1"}
    shard, router = f"127.0.0.1:{shard_port}", f"127.0.0.1:{router_port}"
    procs: list[subprocess.Popen] = []
    try:
        shard_args = ["--model", tiny.model_dir, "--adapters", tiny.adapters_dir]
        shard_args += ["--host", "127.0.0.1", "--port", shard_port, "--device", "cpu"]
        shard_args += ["--max-batch-size", max_batch_size, "--kv-pages", "4096"]
        shard_cmd = [sys.executable, "-m", "shard", *map(str, shard_args)]
        require_serving(shard, launch(procs, workdir, "shard", pins.shard, shard_cmd, env))
        router_cmd = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--http-port=0"]
        router_cmd += ["--port", str(router_port), "--shard", shard]
        router_proc = launch(procs, workdir, "router", pins.router, router_cmd, env)
        require_serving(router, router_proc)
        wait_placing(router)
        proxies = []
        for name, cpus, flags in (
            ("passthrough", pins.passthrough, []),
            ("threaded", pins.threaded, ["--threads"]),
        ):
            port = free_port()
            command = [sys.executable, "-m", "benchmarks.passthrough_proxy", "--shard", shard]
            proc = launch(procs, workdir, name, cpus, [*command, "--port", str(port), *flags], env)
            require_serving(f"127.0.0.1:{port}", proc)
            proxies += [f"127.0.0.1:{port}", proc.pid]
        yield Spawned(shard, router, router_proc.pid, *proxies)
    finally:
        stop_all(procs)


@contextmanager
def fake_fleet(
    workdir: Path, token_delay_s: float, router_cpus: str | None, shard_cpus: str | None
) -> Iterator[tuple[str, int]]:
    """The test suite's fake shard (tokens on a timer, no model) and a router in front of it:
    (router address, router pid)."""
    shard_port, router_port = free_port(), free_port()
    shard_cmd = [sys.executable, "-m", "tests.fake_shard", "--port", str(shard_port)]
    shard_cmd += ["--max-batch-size", "256", "--kv-pages", "1000000"]
    shard_cmd += ["--token-delay-s", str(token_delay_s)]
    router_cmd = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(router_port)]
    router_cmd += ["--shard", f"127.0.0.1:{shard_port}", "--http-port=0"]
    router = f"127.0.0.1:{router_port}"
    procs: list[subprocess.Popen] = []
    try:
        launch(procs, workdir, "fake", shard_cpus, shard_cmd)
        router_proc = launch(procs, workdir, "router", router_cpus, router_cmd)
        require_serving(router, router_proc)
        wait_placing(router)
        yield router, router_proc.pid
    finally:
        stop_all(procs)


def machine() -> dict:
    """What ran the benchmark: CPU, cores, OS, Python, load average when it ran."""
    cpu = platform.processor()
    with_model = Path("/proc/cpuinfo")
    if with_model.exists():
        names = [ln for ln in with_model.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "client_cpus": sorted(os.sched_getaffinity(0)),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
