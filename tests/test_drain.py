"""SIGTERM rehearsals on real processes (tiny model, CPU, loopback), as Kubernetes delivers it.

A shard under load turns NOT_SERVING, finishes or hands back its running requests and exits 0
within the grace period, and no client stream notices beyond its `usage.migrations`. A router
stops accepting new calls and finishes the streams it holds. While weights load, the shard's
port already answers health checks with NOT_SERVING.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from router.local_process import free_port
from shard.config import parse_config
from shard.edge.health import SERVICES, loading_health
from tests.fleet import wait_until
from tests.processes import shard_args, start, stop, wait_serving

pytestmark = pytest.mark.slow

# The test's terminationGracePeriodSeconds: a drained shard or router must be gone by then.
GRACE_S = 15.0
# Seconds any one wait of the test may take.
WAIT_S = 20.0
SHARD_SERVICE = shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Server:
    proc: subprocess.Popen
    address: str
    log: Path

    def events(self, name: str) -> list[dict]:
        """The JSON log lines with this event name (tracebacks and other output are skipped)."""
        lines = self.log.read_text().splitlines()
        return [e for e in map(json.loads, filter(is_json, lines)) if e["event"] == name]


def is_json(line: str) -> bool:
    return line.startswith("{")


@dataclass(frozen=True)
class Job:
    adapter: str
    prompt: tuple[int, ...]
    new_tokens: int

    def request(self) -> generate_pb2.GenerateRequest:
        return generate_pb2.GenerateRequest(
            adapter_id=self.adapter,
            prompt_token_ids=generate_pb2.TokenIds(ids=self.prompt),
            stopping=generate_pb2.StoppingCriteria(max_new_tokens=self.new_tokens, ignore_eos=True),
        )


@dataclass
class Done:
    tokens: list[int]
    migrations: int
    finished_at: float


def run(address: str, job: Job) -> Done:
    """One Generate stream on its own channel; the tokens, the migrations and when it ended."""
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        messages = list(stub.Generate(job.request(), timeout=90))
    last = messages[-1]
    assert last.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert last.usage.generated_tokens == job.new_tokens
    tokens = [t for m in messages for t in m.token_ids]
    return Done(tokens, last.usage.migrations, time.monotonic())


def jobs_for(tiny, count: int, new_tokens: int) -> list[Job]:
    adapters = [*tiny.adapter_ids, ""]
    return [
        Job(adapters[i % len(adapters)], (10 + i, 20 + i, 30, 40 + i), new_tokens)
        for i in range(count)
    ]


def running(address: str) -> int:
    """The shard's running batch size from a fresh WatchLoad stream (0 if it cannot answer)."""
    try:
        with grpc.insecure_channel(address) as channel:
            stream = shard_pb2_grpc.ShardStub(channel).WatchLoad(
                shard_pb2.WatchLoadRequest(), timeout=2
            )
            snapshot = next(stream).snapshot
            stream.cancel()
            return snapshot.running
    except grpc.RpcError:
        return 0


@dataclass
class HealthPoller:
    """Polls Health/Check for `services` until stopped; keeps the distinct statuses in order."""

    address: str
    services: tuple[str, ...]
    seen: dict[str, list[int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> HealthPoller:
        self.seen = {s: [] for s in self.services}
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        wait_until(
            lambda: all(self.seen.values()), f"a first health answer from {self.address}", WAIT_S
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(5)

    def _poll(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                for service in self.services:
                    try:
                        request = health_pb2.HealthCheckRequest(service=service)
                        status = stub.Check(request, timeout=0.5).status
                    except grpc.RpcError:
                        continue
                    if not self.seen[service] or self.seen[service][-1] != status:
                        self.seen[service].append(status)
                time.sleep(0.01)


@pytest.fixture
def launch(tiny, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts shards (`launch("shard", *flags)`) and routers (`launch("router", *flags)`)."""
    started: list[Server] = []
    numbers = itertools.count()

    def launch_one(kind: str, *flags: str) -> Server:
        port = free_port()
        log = tmp_path / f"{kind}{next(numbers)}.log"
        if kind == "shard":
            args = shard_args(tiny, port, "--log-format", "json", *flags)
        else:
            args = ["router", "--host", "127.0.0.1", "--port", str(port), "--log-format", "json"]
            args += ["--http-port=0", *flags]
        server = Server(start(args, log), f"127.0.0.1:{port}", log)
        started.append(server)
        wait_serving(server.address, server.proc, log)
        return server

    try:
        yield launch_one
    finally:
        for server in reversed(started):
            stop(server.proc, signal.SIGKILL)


@pytest.mark.parametrize(
    ("drain_timeout_s", "outcome"), [(30.0, "finish"), (0.2, "migrate")], ids=lambda x: str(x)
)
def test_sigterm_shard_under_load_drains_without_failing_a_stream(
    launch, tiny, drain_timeout_s, outcome
):
    with ThreadPoolExecutor(2) as pool:
        shards = list(
            pool.map(
                lambda _: launch(
                    "shard", "--max-batch-size=4", f"--drain-timeout-s={drain_timeout_s}"
                ),
                range(2),
            )
        )
    router = launch("router", *(f"--shard={s.address}" for s in shards))
    wait_until(
        lambda: all(running(s.address) == 0 for s in shards), "both shards to answer", WAIT_S
    )
    jobs = jobs_for(tiny, 12, 160)
    with ThreadPoolExecutor(6) as pool:
        undisturbed = [d.tokens for d in pool.map(lambda j: run(router.address, j), jobs)]

        futures = [pool.submit(run, router.address, job) for job in jobs]
        # Consolidation fills one shard's batch first: that one gets the signal mid-stream.
        victim = wait_until(
            lambda: next((s for s in shards if running(s.address) >= 2), None),
            "a shard running two or more streams",
            WAIT_S,
        )
        with HealthPoller(victim.address, ("", SHARD_SERVICE)) as health:
            victim.proc.send_signal(signal.SIGTERM)
            exit_code = victim.proc.wait(GRACE_S)
        results = [f.result(timeout=90) for f in futures]

    assert exit_code == 0, victim.log.read_text()[-3000:]
    # Polled while the process still answered, so NOT_SERVING came before the exit.
    for service in ("", SHARD_SERVICE):
        assert health.seen[service] == [SERVING, NOT_SERVING], (service, health.seen)
    assert [r.tokens for r in results] == undisturbed
    timed_out = victim.events("drain timeout: migrating the rest")
    if outcome == "finish":
        assert not timed_out
        assert victim.events("drained")[0]["running"] == 0
    else:
        assert timed_out and timed_out[0]["running"] >= 1
        assert sum(r.migrations for r in results) >= 1


def test_sigterm_router_refuses_new_calls_and_finishes_open_streams(launch, tiny):
    # Two requests at a time: the rest wait in the router's queue, so streams stay open for seconds.
    shard = launch("shard", "--max-batch-size=2")
    metrics_port = free_port()
    router = launch(
        "router",
        f"--shard={shard.address}",
        "--shutdown-grace-s=30",
        f"--metrics-port={metrics_port}",
    )
    wait_until(lambda: running(shard.address) == 0, "the shard to answer", WAIT_S)
    jobs = jobs_for(tiny, 10, 200)

    def queued_in_router() -> float:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return float(re.search(r"^lorafleet_router_queue_depth (\S+)$", text, re.M)[1])

    statuses: list[int] = []

    def watch_router_health() -> None:
        with grpc.insecure_channel(router.address) as channel:
            # The timeout ends the watch (and the test's thread pool) should the router not stop.
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=60
            )
            for message in stream:
                statuses.append(message.status)
                if message.status != SERVING:
                    stream.cancel()  # an open Watch would hold the router for its whole grace
                    return

    def refused() -> float:
        with pytest.raises(grpc.RpcError) as err:
            run(router.address, jobs[0])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        return time.monotonic()

    with ThreadPoolExecutor(12) as pool:
        watcher = pool.submit(watch_router_health)
        wait_until(lambda: statuses, "the router's health watch", WAIT_S)
        futures = [pool.submit(run, router.address, job) for job in jobs]

        # Every call is inside the router before the signal: done, on the shard, or queued.
        def all_inside() -> bool:
            queued, done = queued_in_router(), sum(f.done() for f in futures)
            return queued >= 2 and queued + running(shard.address) + done == len(jobs)

        wait_until(all_inside, "every call to be inside the router, some queued", WAIT_S)
        router.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: NOT_SERVING in statuses, "the router to report NOT_SERVING", WAIT_S)
        refused_at = refused()
        results = [f.result(timeout=90) for f in futures]
        watcher.result(timeout=10)
    assert router.proc.wait(GRACE_S) == 0, router.log.read_text()[-3000:]

    assert statuses == [SERVING, NOT_SERVING]
    # Streams accepted before the signal kept streaming after new calls were refused.
    assert max(r.finished_at for r in results) > refused_at
    with ThreadPoolExecutor(2) as pool:
        undisturbed = [d.tokens for d in pool.map(lambda j: run(shard.address, j), jobs)]
    assert [r.tokens for r in results] == undisturbed


def test_health_answers_not_serving_while_loading(tiny):
    port = free_port()
    tiny_dirs = ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir)]
    cfg = parse_config([*tiny_dirs, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"])
    with loading_health(cfg), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", *SERVICES):
            request = health_pb2.HealthCheckRequest(service=service)
            assert stub.Check(request, timeout=5).status == NOT_SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            generate_pb2_grpc.GeneratorStub(channel).GetInfo(
                generate_pb2.GetInfoRequest(), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # A second shard on the same port fails before it would load anything.
        with pytest.raises(SystemExit, match="cannot bind"), loading_health(cfg):
            pass
    # The port is free again for the full server, which binds it the same way.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
