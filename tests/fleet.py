"""Router, fake-shard and real-shard processes for the router and cluster tests.

Every client call here is synchronous and every server is its own process, so no test shares an
event loop with a server. Processes started through the `launch` fixture are always stopped at the
end of the test module, even on failure. Test modules import the fixtures they use by name.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
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

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from router.local_process import free_port, wait_serving
from tests.fake_shard import expected_tokens, token_text
from tests.processes import REPO, shard_args

START_TIMEOUT_S = 15.0
# A real shard imports torch and loads the tiny model; several start at once on two cores.
SHARD_START_TIMEOUT_S = 90.0


def wait_until(check: Callable[[], object], what: str, timeout: float = 10.0) -> object:
    """Polls `check` (gRPC errors count as "not yet") until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(grpc.RpcError):
            if result := check():
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def child_env() -> dict[str, str]:
    """The test's environment without LORAFLEET_* defaults, with the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def load_snapshot(address: str) -> shard_pb2.LoadSnapshot:
    """The first snapshot of a fresh WatchLoad stream: the shard's load now."""
    with grpc.insecure_channel(address) as channel:
        stream = shard_pb2_grpc.ShardStub(channel).WatchLoad(
            shard_pb2.WatchLoadRequest(), timeout=5
        )
        snapshot = next(stream).snapshot
        stream.cancel()
        return snapshot


class Process:
    """A child Python process with its output in files; stop() always reaps it."""

    def __init__(self, args: list[str], log_dir: Path, name: str):
        self.name = name
        self.stdout = log_dir / f"{name}.out"
        self.stderr = log_dir / f"{name}.err"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *args], cwd=REPO, stdout=out, stderr=err, env=child_env()
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

    def output(self) -> str:
        """The tail of what the process wrote, for assertion messages."""
        return (self.stdout.read_text() + self.stderr.read_text())[-3000:]


class Fake(Process):
    """A fake shard (tests/fake_shard.py); `address` is known once it listens."""

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
        return load_snapshot(self.address)


class Shard(Process):
    """A real `python -m shard` process on the tiny model (CPU); ready once SERVING."""

    def __init__(self, log_dir: Path, name: str, tiny, host: str, *opts: str):
        self.port = free_port()
        self.address = f"{host}:{self.port}"
        super().__init__(
            ["-m", *shard_args(tiny, self.port, "--host", host, "--log-format", "json", *opts)],
            log_dir,
            name,
        )

    def wait_serving(self) -> None:
        why = wait_serving(self.address, self.proc, SHARD_START_TIMEOUT_S)
        assert why is None, f"shard {self.name}: {why}:\n{self.output()}"

    def snapshot(self) -> shard_pb2.LoadSnapshot:
        return load_snapshot(self.address)


class Router(Process):
    """A router process and a client channel to it."""

    def __init__(self, log_dir: Path, name: str, *args: str):
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
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
                "--http-port",
                str(self.http_port),
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
        why = wait_serving(self.address, self.proc, START_TIMEOUT_S)
        assert why is None, f"router {name}: {why}:\n{self.output()}"

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
    """Starts processes for one test module: `launch(Fake, ...)`; stops all of them at the end."""
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
        # Signal every process first so that their shutdowns overlap, then reap each.
        for process in started:
            if process.proc.poll() is None:
                process.proc.send_signal(signal.SIGTERM)
        for process in reversed(started):
            process.stop()


class Zone:
    """A DNS resolver answering one name with a changeable list of A records, like the shards'
    headless Service."""

    def __init__(self, name: str):
        self.name = name
        self.addresses: list[str] = []
        self.lock = threading.Lock()

    def resolve(self, request: dnslib.DNSRecord, handler: object) -> dnslib.DNSRecord:
        reply = request.reply()
        if str(request.q.qname).rstrip(".") != self.name:
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            return reply
        with self.lock:
            for address in self.addresses:
                reply.add_answer(dnslib.RR(request.q.qname, rdata=dnslib.A(address), ttl=1))
        return reply

    def publish(self, address: str) -> None:
        with self.lock:
            self.addresses.append(address)


@pytest.fixture
def dns() -> Iterator[tuple[Zone, int]]:
    """A DNS server on a loopback port answering `shards.lorafleet.test`: (its zone, its port)."""
    zone = Zone("shards.lorafleet.test")
    server = DNSServer(zone, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    try:
        yield zone, server.server.server_address[1]
    finally:
        server.stop()


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


def collect(stream: Iterator[generate_pb2.GenerateResponse]) -> Completion:
    """Reads a Generate stream to its end; asserts exactly one finish, on the last message."""
    ids: list[int] = []
    text = ""
    finish = None
    for message in stream:
        assert finish is None, "a message after the finish"
        ids.extend(message.token_ids)
        text += message.text
        if message.finish_reason:
            finish = message
    assert finish is not None, "the stream ended without a finish reason"
    return Completion(ids, text, finish)


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
    return collect(stub.Generate(request, timeout=timeout))


def assert_exact(done: Completion, adapter: str, prompt: str, tokens: int) -> None:
    """Every token exactly once, in order, text matching, usage counting each token once."""
    expected = expected_tokens(adapter, prompt, tokens)
    assert done.token_ids == expected
    assert done.text == "".join(map(token_text, expected))
    assert done.finish.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert done.finish.usage.generated_tokens == tokens
