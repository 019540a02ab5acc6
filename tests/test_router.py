"""The router as a real process in front of fake shard processes (tests/fake_shard.py).

Every client call here is synchronous and every server is its own process, so no test shares an
event loop with a server. Processes are always stopped by the fixtures, even on failure.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dnslib
import grpc
import pytest
from dnslib.server import DNSLogger, DNSServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from router.config import ConfigError, Endpoint, Policy, parse_config
from tests.fake_shard import expected_tokens, token_text

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], object], what: str, timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(grpc.RpcError):
            if result := check():
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Process:
    """A child Python process with its output in files; stop() always reaps it."""

    def __init__(self, args: list[str], log_dir: Path, name: str):
        self.stdout = log_dir / f"{name}.out"
        self.stderr = log_dir / f"{name}.err"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *args], cwd=REPO, stdout=out, stderr=err, env=_child_env()
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Fake(Process):
    """A fake shard; `address` is known once it listens."""

    def __init__(self, log_dir: Path, name: str, host: str = "127.0.0.1", port: int = 0, *opts):
        super().__init__(
            ["-m", "tests.fake_shard", "--host", host, "--port", str(port), *opts], log_dir, name
        )
        listening = wait_until(
            lambda: self._events("listening") or self.proc.poll() is not None,
            f"fake shard {name} to listen",
            START_TIMEOUT_S,
        )
        assert self.proc.poll() is None, self.stderr.read_text()
        self.port = listening[0]["port"]
        self.address = f"{host}:{self.port}"

    def _events(self, kind: str) -> list[dict]:
        lines = self.stdout.read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == kind]

    def events(self, kind: str, request_id: str | None = None) -> list[dict]:
        found = self._events(kind)
        return [e for e in found if request_id is None or e.get("request_id") == request_id]

    def snapshot(self) -> shard_pb2.LoadSnapshot:
        with grpc.insecure_channel(self.address) as channel:
            stream = shard_pb2_grpc.ShardStub(channel).WatchLoad(
                shard_pb2.WatchLoadRequest(), timeout=5
            )
            snapshot = next(stream).snapshot
            stream.cancel()
            return snapshot


class Router(Process):
    """A router process and a client channel to it."""

    def __init__(self, log_dir: Path, name: str, *args: str):
        self.port = free_port()
        self.metrics_port = free_port()
        super().__init__(
            [
                "-m",
                "router",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
                "--log-format",
                "json",
                *args,
            ],
            log_dir,
            name,
        )
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = generate_pb2_grpc.GeneratorStub(self.channel)
        health = health_pb2_grpc.HealthStub(self.channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        wait_until(
            lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == serving,
            f"router {name} to serve",
            START_TIMEOUT_S,
        )

    def shards(self) -> list[str]:
        try:
            return list(self.stub.GetInfo(generate_pb2.GetInfoRequest(), timeout=2).shards)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            return []

    def wait_shards(self, expected: list[str]) -> None:
        wait_until(lambda: sorted(self.shards()) == sorted(expected), f"shards {expected}")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        self.channel.close()
        return super().stop(sig, timeout)


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> Iterator[Callable[..., Process]]:
    """Starts fakes and routers for one test module; stops all of them at the end."""
    log_dir = tmp_path_factory.mktemp("procs")
    started: list[Process] = []
    numbers = itertools.count()

    def start(kind: type[Process], *args, **kwargs) -> Process:
        name = f"{kind.__name__.lower()}{next(numbers)}"
        process = kind(log_dir, name, *args, **kwargs)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in reversed(started):
            process.stop()


@dataclass
class Fleet:
    fakes: list[Fake]
    router: Router


@pytest.fixture(scope="module")
def fleet(launch) -> Fleet:
    """Two fake shards (batch 8, 10 ms per token) behind one router, shared by simple tests."""
    with ThreadPoolExecutor() as pool:
        fakes = list(pool.map(lambda _: launch(Fake), range(2)))
    router = launch(Router, *(f"--shard={f.address}" for f in fakes))
    router.wait_shards([f.address for f in fakes])
    return Fleet(fakes, router)


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish: generate_pb2.GenerateResponse


def generate(
    stub: generate_pb2_grpc.GeneratorStub,
    prompt: str,
    adapter: str = "a",
    tokens: int = 12,
    request_id: str = "",
    timeout: float = 20,
) -> Completion:
    request = generate_pb2.GenerateRequest(
        request_id=request_id,
        adapter_id=adapter,
        prompt=prompt,
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=tokens),
    )
    ids: list[int] = []
    text = ""
    finish = None
    for message in stub.Generate(request, timeout=timeout):
        assert finish is None, "a message after the finish"
        ids.extend(message.token_ids)
        text += message.text
        if message.finish_reason:
            finish = message
    assert finish is not None, "the stream ended without a finish reason"
    return Completion(ids, text, finish)


def assert_exact(done: Completion, adapter: str, prompt: str, tokens: int) -> None:
    """Every token exactly once, in order, text matching, usage counting each token once."""
    expected = expected_tokens(adapter, prompt, tokens)
    assert done.token_ids == expected
    assert done.text == "".join(map(token_text, expected))
    assert done.finish.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert done.finish.usage.generated_tokens == tokens


# -- proxying, migration, errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "resumed_at"),
    [
        ("plain prompt", None),
        ("kv runs out migrate@3", 3),
        ("kv runs out before the first token migrate@0", 0),
        ("the shard drains drain@5", 5),
        ("the shard goes UNAVAILABLE abort@4", 4),
        ("one token left migrate@11", 11),
    ],
)
def test_stream_continues_across_migration_exactly(fleet, prompt, resumed_at):
    request_id = f"exact-{abs(hash(prompt))}"
    done = generate(fleet.router.stub, prompt, "b", 12, request_id)
    assert_exact(done, "b", prompt, 12)
    assert done.finish.usage.migrations == (0 if resumed_at is None else 1)
    assert done.finish.usage.time_to_first_token_s > 0
    starts = [e for f in fleet.fakes for e in f.events("start", request_id)]
    assert sorted(e["resumed"] for e in starts) == [0] + (
        [] if resumed_at is None else [resumed_at]
    )


def test_concurrent_streams_for_many_adapters(fleet):
    jobs = [
        (adapter, f"prompt {i} for {adapter or 'base'}") for i in range(3) for adapter in "abc "
    ]
    jobs = [(adapter.strip(), prompt) for adapter, prompt in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: generate(fleet.router.stub, job[1], job[0], 20), jobs))
    for (adapter, prompt), done in zip(jobs, results, strict=True):
        assert_exact(done, adapter, prompt, 20)


@pytest.mark.parametrize(
    ("adapter", "prompt", "code", "details"),
    [
        ("nope", "hello", grpc.StatusCode.NOT_FOUND, "adapter 'nope' not under the root"),
        ("a", "error:INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT, "scripted"),
        ("a", "error:FAILED_PRECONDITION", grpc.StatusCode.FAILED_PRECONDITION, "scripted"),
    ],
)
def test_shard_errors_pass_through(fleet, adapter, prompt, code, details):
    with pytest.raises(grpc.RpcError) as raised:
        generate(fleet.router.stub, prompt, adapter)
    assert raised.value.code() == code
    assert details in raised.value.details()


def test_deadline_reaches_the_shard(fleet):
    generate(fleet.router.stub, "with a deadline", request_id="deadline-1", timeout=3.0)
    (start,) = [e for f in fleet.fakes for e in f.events("start", "deadline-1")]
    assert 2.0 < start["deadline_s"] < 3.1  # grpc rounds deadlines up slightly


def test_deadline_expiry_ends_the_shard_call(fleet):
    with pytest.raises(grpc.RpcError) as raised:
        generate(fleet.router.stub, "too slow", tokens=500, request_id="deadline-2", timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(
        lambda: [e for f in fleet.fakes for e in f.events("cancelled", "deadline-2")],
        "the shard to see its call end",
    )


def test_client_cancel_reaches_the_shard_and_frees_its_pages(fleet):
    request = generate_pb2.GenerateRequest(
        request_id="cancel-1",
        adapter_id="c",
        prompt="cancel me",
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=1000),
    )
    stream = fleet.router.stub.Generate(request, timeout=30)
    next(stream), next(stream)
    (fake,) = [f for f in fleet.fakes if f.events("start", "cancel-1")]
    assert fake.snapshot().running >= 1
    stream.cancel()
    wait_until(lambda: fake.events("cancelled", "cancel-1"), "the shard to see the cancel", 3)
    wait_until(lambda: fake.snapshot().running == 0, "the shard's batch to empty", 3)
    assert fake.snapshot().kv_pages_free == fake.snapshot().kv_pages_total


def test_list_adapters_aggregates_every_shard(fleet):
    reply = fleet.router.stub.ListAdapters(generate_pb2.ListAdaptersRequest(), timeout=5)
    entries = sorted((a.shard, a.adapter_id) for a in reply.adapters)
    shards = sorted(f.address for f in fleet.fakes)
    assert entries == [(shard, adapter) for shard in shards for adapter in "abc"]


def test_get_info_describes_model_and_shards(fleet):
    info = fleet.router.stub.GetInfo(generate_pb2.GetInfoRequest(), timeout=5)
    assert info.model == "fake-llama"
    assert info.max_context == 4096
    assert sorted(info.shards) == sorted(f.address for f in fleet.fakes)


def test_health_serving(fleet):
    health = health_pb2_grpc.HealthStub(fleet.router.channel)
    for service in ("", "lorafleet.v1.Generator"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services_and_grpcurl_streams(fleet):
    target = fleet.router.address
    listed = subprocess.run(
        ["grpcurl", "-plaintext", target, "list"], capture_output=True, text=True, timeout=20
    )
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "lorafleet.v1.Generator",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    body = json.dumps({"adapter_id": "a", "prompt": "grpcurl", "stopping": {"max_new_tokens": 3}})
    streamed = subprocess.run(
        ["grpcurl", "-plaintext", "-d", body, target, "lorafleet.v1.Generator/Generate"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert streamed.returncode == 0, streamed.stderr
    assert "FINISH_REASON_LENGTH" in streamed.stdout
    assert token_text(expected_tokens("a", "grpcurl", 3)[2]).strip() in streamed.stdout


def test_metrics_are_exported(fleet):
    generate(fleet.router.stub, "for the metrics")
    with contextlib.suppress(grpc.RpcError):
        generate(fleet.router.stub, "x", adapter="made-up-adapter")
    text = fleet.router.metrics()
    for name in (
        'lorafleet_router_requests_total{adapter="a",status="OK"}',
        'lorafleet_router_requests_total{adapter="<unknown>",status="NOT_FOUND"}',
        "lorafleet_router_queue_time_seconds_count",
        "lorafleet_router_time_to_first_token_seconds_count",
        "lorafleet_router_inter_token_latency_seconds_count",
        'lorafleet_router_migrations_total{reason="kv_exhausted"}',
        "lorafleet_router_queue_depth",
        "lorafleet_router_shards 2.0",
        f'lorafleet_router_shard_running{{shard="{fleet.fakes[0].address}"}}',
        f'lorafleet_router_shard_kv_pages_used{{shard="{fleet.fakes[1].address}"}}',
    ):
        assert name in text, name
    assert "made-up-adapter" not in text


def test_client_cli_streams_and_lists(fleet):
    def lorafleet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "router.client", *args],
            cwd=REPO,
            env=_child_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )

    target = f"--target={fleet.router.address}"
    done = lorafleet("generate", target, "--adapter=b", "--max-new-tokens=5", "cli prompt")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        == "".join(map(token_text, expected_tokens("b", "cli prompt", 5))).strip()
    )
    assert "length: 2 prompt + 5 generated tokens" in done.stderr
    listed = lorafleet("adapters", target)
    assert listed.returncode == 0, listed.stderr
    assert all(f.address in listed.stdout for f in fleet.fakes)
    missing = lorafleet("generate", target, "--adapter=nope", "x")
    assert missing.returncode == 1
    assert "NOT_FOUND: adapter 'nope' not under the root" in missing.stderr


# -- placement, queueing, failures -----------------------------------------------------------


def _placements(fakes: list[Fake], prefix: str) -> list[int]:
    counts = [
        sum(e["request_id"].startswith(prefix) and e["resumed"] == 0 for e in f.events("start"))
        for f in fakes
    ]
    return sorted(counts, reverse=True)


@pytest.fixture(scope="module")
def trio(launch) -> list[Fake]:
    """Three idle fake shards with a batch of 4."""
    with ThreadPoolExecutor() as pool:
        return list(
            pool.map(lambda _: launch(Fake, "127.0.0.1", 0, "--max-batch-size=4"), range(3))
        )


@pytest.mark.parametrize(
    ("policy", "expected"), [("consolidate", [4, 4, 2]), ("least-loaded", [4, 3, 3])]
)
def test_burst_placement_follows_the_policy(launch, trio, policy, expected):
    router = launch(Router, f"--policy={policy}", *(f"--shard={f.address}" for f in trio))
    router.wait_shards([f.address for f in trio])
    prefix = f"burst-{policy}-"
    with ThreadPoolExecutor(10) as pool:
        results = list(
            pool.map(
                lambda i: generate(router.stub, f"burst {i}", "a", 40, f"{prefix}{i}"), range(10)
            )
        )
    for i, done in enumerate(results):
        assert_exact(done, "a", f"burst {i}", 40)
    assert _placements(trio, prefix) == expected
    router.stop()


def test_drained_shard_gets_no_new_requests(launch, trio):
    router = launch(Router, *(f"--shard={f.address}" for f in trio))
    router.wait_shards([f.address for f in trio])
    # Consolidation sends a lone request to the smallest shard id; drain exactly that one.
    first = generate(router.stub, "who takes me", request_id="drain-probe")
    assert_exact(first, "a", "who takes me", 12)
    (drained,) = [f for f in trio if f.events("start", "drain-probe")]
    running = router.stub.Generate(
        generate_pb2.GenerateRequest(
            request_id="drain-running",
            adapter_id="a",
            prompt="running while draining",
            stopping=generate_pb2.StoppingCriteria(max_new_tokens=60),
        ),
        timeout=20,
    )
    ids = list(next(running).token_ids)
    with grpc.insecure_channel(drained.address) as channel:
        shard_pb2_grpc.ShardStub(channel).Drain(shard_pb2.DrainRequest(), timeout=5)
    router.wait_shards([f.address for f in trio if f is not drained])
    for message in running:
        ids.extend(message.token_ids)
    assert ids == expected_tokens("a", "running while draining", 60)
    for i in range(4):
        generate(router.stub, f"after drain {i}", request_id=f"after-drain-{i}")
        assert not drained.events("start", f"after-drain-{i}")
    router.stop()


def test_queue_bound_answers_resource_exhausted(launch):
    fake = launch(Fake, "127.0.0.1", 0, "--max-batch-size=1")
    router = launch(Router, f"--shard={fake.address}", "--queue-size=1")
    router.wait_shards([fake.address])
    hold = router.stub.Generate(
        generate_pb2.GenerateRequest(
            adapter_id="a",
            prompt="holds the only slot",
            stopping=generate_pb2.StoppingCriteria(max_new_tokens=1000),
        ),
        timeout=30,
    )
    next(hold)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(generate, router.stub, "waits its turn", "b", 5)
        wait_until(
            lambda: "lorafleet_router_queue_depth 1.0" in router.metrics(), "one queued request"
        )
        with pytest.raises(grpc.RpcError) as raised:
            generate(router.stub, "one too many", "c", 5)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--queue-size" in raised.value.details()
        assert "retry" in raised.value.details()
        assert ("grpc-retry-pushback-ms", "1000") in raised.value.trailing_metadata()
        assert not waiting.done()
        hold.cancel()
        assert_exact(waiting.result(timeout=10), "b", "waits its turn", 5)


def test_killed_shard_streams_finish_elsewhere(launch):
    fakes = [launch(Fake, "127.0.0.1", 0, "--token-delay-s=0.05") for _ in range(2)]
    router = launch(Router, *(f"--shard={f.address}" for f in fakes))
    router.wait_shards([f.address for f in fakes])
    prompts = [f"survive the crash {i}" for i in range(4)]
    streams = [
        router.stub.Generate(
            generate_pb2.GenerateRequest(
                request_id=f"crash-{i}",
                adapter_id="a",
                prompt=prompt,
                stopping=generate_pb2.StoppingCriteria(max_new_tokens=30),
            ),
            timeout=30,
        )
        for i, prompt in enumerate(prompts)
    ]
    received = [list(next(stream).token_ids) for stream in streams]
    # Consolidation put all four on one shard: kill it mid-stream.
    (victim,) = [f for f in fakes if f.events("start", "crash-0")]
    assert all(victim.events("start", f"crash-{i}") for i in range(4))
    victim.stop(signal.SIGKILL)
    for stream, ids in zip(streams, received, strict=True):
        final = None
        for message in stream:
            ids.extend(message.token_ids)
            final = message
        assert final is not None
        assert final.usage.migrations == 1
        assert final.usage.generated_tokens == 30
    assert received == [expected_tokens("a", p, 30) for p in prompts]
    (survivor,) = [f for f in fakes if f is not victim]
    assert all(survivor.events("start", f"crash-{i}")[0]["resumed"] > 0 for i in range(4))


def test_sigterm_lets_open_streams_finish(launch, fleet):
    router = launch(Router, "--shutdown-grace-s=10", *(f"--shard={f.address}" for f in fleet.fakes))
    router.wait_shards([f.address for f in fleet.fakes])
    stream = router.stub.Generate(
        generate_pb2.GenerateRequest(
            adapter_id="a",
            prompt="finish before exit",
            stopping=generate_pb2.StoppingCriteria(max_new_tokens=80),
        ),
        timeout=20,
    )
    ids = list(next(stream).token_ids)
    router.proc.send_signal(signal.SIGTERM)
    for message in stream:
        ids.extend(message.token_ids)
    assert ids == expected_tokens("a", "finish before exit", 80)
    assert router.proc.wait(10) == 0


# -- discovery through real DNS --------------------------------------------------------------


class Zone:
    """A DNS resolver answering one name with a changeable list of A records."""

    def __init__(self, name: str):
        self.name = name
        self.addresses: list[str] = []
        self.lock = threading.Lock()

    def resolve(self, request: dnslib.DNSRecord, handler) -> dnslib.DNSRecord:
        reply = request.reply()
        if str(request.q.qname).rstrip(".") != self.name:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            return reply
        with self.lock:
            for address in self.addresses:
                reply.add_answer(dnslib.RR(request.q.qname, rdata=dnslib.A(address), ttl=1))
        return reply


@pytest.fixture
def dns() -> Iterator[tuple[Zone, int]]:
    zone = Zone("shards.lorafleet.test")
    server = DNSServer(zone, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    try:
        yield zone, server.server.server_address[1]
    finally:
        server.stop()


def test_dns_discovery_adds_and_removes_shards_while_requests_run(launch, dns):
    zone, dns_port = dns
    first = launch(Fake, "127.0.0.2", 0, "--max-batch-size=4", "--token-delay-s=0.04")
    second = launch(Fake, "127.0.0.3", first.port, "--max-batch-size=4", "--token-delay-s=0.04")
    zone.addresses = ["127.0.0.2"]
    router = launch(
        Router,
        f"--shard-dns={zone.name}:{first.port}",
        f"--dns-server=127.0.0.1:{dns_port}",
        "--resolve-interval-s=0.2",
    )
    router.wait_shards([first.address])

    with ThreadPoolExecutor(8) as pool:
        early = [
            pool.submit(generate, router.stub, f"early {i}", "a", 100, f"dns-early-{i}")
            for i in range(4)
        ]
        wait_until(
            lambda: all(first.events("start", f"dns-early-{i}") for i in range(4)),
            "the first shard to run four streams",
        )
        with zone.lock:
            zone.addresses = ["127.0.0.2", "127.0.0.3"]
        router.wait_shards([first.address, second.address])
        # The first shard's batch is full (4 streams of 4 s): the new shard takes the next one.
        joined = pool.submit(generate, router.stub, "joined", "b", 10, "dns-joined")
        wait_until(lambda: second.events("start", "dns-joined"), "the new shard to be used")
        with zone.lock:
            zone.addresses = ["127.0.0.3"]
        router.wait_shards([second.address])
        after = generate(router.stub, "after removal", "c", 10, "dns-after")
        for i, future in enumerate(early):
            assert_exact(future.result(timeout=20), "a", f"early {i}", 100)
        assert_exact(joined.result(timeout=20), "b", "joined", 10)
    assert_exact(after, "c", "after removal", 10)
    assert second.events("start", "dns-after")
    # Leaving the table did not cut the first shard's running streams.
    assert not first.events("cancelled")
    assert not first.events("migrated")


# -- configuration ---------------------------------------------------------------------------


def test_config_from_flags_and_environment():
    config = parse_config(
        ["--shard", "h1:1", "--shard", "[::1]:2", "--queue-size", "3"], {"LORAFLEET_PORT": "7000"}
    )
    assert config.shards == (Endpoint("h1", 1), Endpoint("::1", 2))
    assert str(config.shards[1]) == "[::1]:2"
    assert (config.port, config.queue_size, config.policy) == (7000, 3, Policy.CONSOLIDATE)
    from_env = parse_config(
        [], {"LORAFLEET_SHARDS": "a:1, b:2", "LORAFLEET_POLICY": "least-loaded"}
    )
    assert from_env.shards == (Endpoint("a", 1), Endpoint("b", 2))
    assert from_env.policy is Policy.LEAST_LOADED
    # A flag wins over the environment as a pair: --shard-dns replaces LORAFLEET_SHARDS.
    dns = parse_config(["--shard-dns", "svc:50061"], {"LORAFLEET_SHARDS": "a:1"})
    assert (dns.shards, dns.shard_dns) == ((), Endpoint("svc", 50061))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "either --shard"),
        (["--shard", "a:1", "--shard-dns", "b:2"], "either --shard"),
        (["--shard", "a"], "expected HOST:PORT"),
        (["--shard", "a:70000"], "outside 1..65535"),
        (["--shard", "a:1", "--shard", "a:1"], "twice"),
        (["--shard", "a:1", "--queue-size", "-1"], "--queue-size"),
        (["--shard", "a:1", "--port", "x"], "expected an integer"),
        (["--shard", "a:1", "--dns-server", "127.0.0.1:53"], "--dns-server"),
    ],
)
def test_config_rejects_bad_values(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv, {})
