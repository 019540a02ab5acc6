"""A tensor-parallel shard (TP=2, gloo) whose ranks die: nothing hangs, the shard exits non-zero,
streams end with UNAVAILABLE (which the router turns into a lossless migration)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generate_pb2, generate_pb2_grpc
from router.local_process import free_port
from tests.fleet import wait_until
from tests.processes import shard_args, start, stop, wait_serving
from tests.reference import greedy

pytestmark = pytest.mark.slow
TIMEOUT_S = 4  # --tp-timeout-s: every collective gives up after this
EXIT_BOUND_S = 15  # a lost rank to the shard process gone
PROMPT = [5, 17, 29, 41]


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (the spawned followers, and a resource tracker)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"resource_tracker" not in cmdline:
            kids.append(int(entry.name))
    return kids


def follower_of(proc: subprocess.Popen) -> int:
    kids = children(proc.pid)
    assert len(kids) == 1, f"expected one follower of {proc.pid}, found {kids}"
    return kids[0]


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def request(max_new_tokens: int) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt_token_ids=generate_pb2.TokenIds(ids=PROMPT),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


def watch_health(address: str, seen: list[int]) -> threading.Thread:
    """Records every health status the shard announces until its server goes away."""

    def run() -> None:
        with grpc.insecure_channel(address) as ch:
            try:
                stream = health_pb2_grpc.HealthStub(ch).Watch(
                    health_pb2.HealthCheckRequest(service=""), timeout=60
                )
                seen.extend(r.status for r in stream)
            except grpc.RpcError:
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def tp_shard(tiny, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    port = free_port()
    log = tmp_path / "shard.log"
    proc = start(shard_args(tiny, port, "--tp", "2", "--tp-timeout-s", str(TIMEOUT_S)), log)
    try:
        wait_serving(f"127.0.0.1:{port}", proc, log)
        yield f"127.0.0.1:{port}", proc, log
    finally:
        stop(proc, signal.SIGKILL)


def test_follower_killed_mid_stream_takes_shard_down(tp_shard) -> None:
    address, proc, log = tp_shard
    follower = follower_of(proc)
    # Idle past the group timeout: rank 0's heartbeats keep the follower's wait from expiring.
    time.sleep(TIMEOUT_S + 1.5)
    assert proc.poll() is None and not gone(follower), log.read_text()[-3000:]
    with grpc.insecure_channel(address) as ch:
        stub = generate_pb2_grpc.GeneratorStub(ch)
        assert sum(len(m.token_ids) for m in stub.Generate(request(3), timeout=30)) == 3

        health: list[int] = []
        watcher = watch_health(address, health)
        stream = stub.Generate(request(200), timeout=60)
        assert next(stream).token_ids
        os.kill(follower, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "tensor-parallel" in err.value.details()
    assert proc.wait(EXIT_BOUND_S) == 1, log.read_text()[-3000:]
    assert time.monotonic() - killed < EXIT_BOUND_S
    watcher.join(5)
    assert health[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in health, health


def test_idle_follower_killed_takes_shard_down(tp_shard) -> None:
    """No request runs: the heartbeat alone notices the dead rank."""
    _, proc, log = tp_shard
    os.kill(follower_of(proc), signal.SIGKILL)
    assert proc.wait(EXIT_BOUND_S) == 1, log.read_text()[-3000:]
    assert "tensor-parallel group lost" in log.read_text()


def test_router_resumes_stream_when_a_rank_dies(tiny, tmp_path: Path) -> None:
    """The stream on a TP=2 shard whose follower dies moves to the other TP=2 shard: the client
    sees every token once. Then the other shard's rank 0 is killed: its follower exits too."""
    ports = sorted((free_port(), free_port()), key=lambda p: f"127.0.0.1:{p}")
    router_port = free_port()
    # The router breaks ties by address: the first shard gets the request.
    shards = [
        start(
            shard_args(tiny, port, "--tp", "2", "--tp-timeout-s", str(TIMEOUT_S)),
            tmp_path / f"shard{port}.log",
        )
        for port in ports
    ]
    router = start(
        ["router", "--host", "127.0.0.1", "--port", str(router_port), "--http-port=0"]
        + [arg for port in ports for arg in ("--shard", f"127.0.0.1:{port}")],
        tmp_path / "router.log",
    )
    new = 120
    try:
        for port, proc in zip(ports, shards, strict=True):
            wait_serving(f"127.0.0.1:{port}", proc, tmp_path / f"shard{port}.log")
        wait_serving(f"127.0.0.1:{router_port}", router, tmp_path / "router.log")
        with grpc.insecure_channel(f"127.0.0.1:{router_port}") as ch:
            # Both shards in the router's table (a shard still loading answers UNIMPLEMENTED to
            # the load watch, and the router retries with backoff), so the tie-break holds.
            info = generate_pb2_grpc.GeneratorStub(ch).GetInfo
            wait_until(
                lambda: len(info(generate_pb2.GetInfoRequest(), timeout=2).shards) == 2,
                "both shards in the router's table",
                timeout=30,
            )
            stream = generate_pb2_grpc.GeneratorStub(ch).Generate(request(new), timeout=60)
            tokens = list(next(stream).token_ids)
            os.kill(follower_of(shards[0]), signal.SIGKILL)
            messages = list(stream)
        tokens += [t for m in messages for t in m.token_ids]
        assert shards[0].wait(EXIT_BOUND_S) == 1
        assert messages[-1].usage.migrations == 1, (tmp_path / "router.log").read_text()[-3000:]
        assert tokens == greedy(tiny.model_dir, None, PROMPT, new)[0]

        follower = follower_of(shards[1])
        os.kill(shards[1].pid, signal.SIGKILL)
        deadline = time.monotonic() + EXIT_BOUND_S
        while not gone(follower) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(follower), "the follower outlived its rank 0"
    finally:
        for proc in (router, *shards):
            stop(proc, signal.SIGKILL)
