"""Router capacity: one router process holding thousands of concurrent streams.

The tests' fake shards (`tests/fake_shard.py`: no model, a token every `token_delay_s`, load
snapshots spaced as a real shard spaces them) serve behind one real router process; this
process opens `streams` Generate calls through the router over several client connections, all
at once, each for a few tokens, and checks every token of every stream against the fake's
deterministic completion. Measured on the router, from /proc: resident memory when idle and at
the peak (memory per open stream), and CPU time in two phases: until every stream has its first
token (placement, the shard call and the first message: CPU per stream), then until the last
stream ends (token messages and teardown: CPU per forwarded message).
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from benchmarks.serving_procs import cpu_seconds, launch, require_serving, stop_all
from protos import generate_pb2, generate_pb2_grpc
from router.local_process import free_port
from tests.fake_shard import expected_tokens


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _Client:
    """Streams through the router; counts what it saw."""

    def __init__(self, router: str, connections: int, tokens: int):
        # A local subchannel pool per channel: otherwise grpc shares one connection among them.
        self.channels = [
            grpc.aio.insecure_channel(router, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)
        ]
        self.stubs = [generate_pb2_grpc.GeneratorStub(c) for c in self.channels]
        self.tokens = tokens
        self.open = self.peak_open = self.first_tokens = self.messages = 0
        self.failed: list[str] = []
        self.all_first = asyncio.Event()
        self.streams = 0

    async def stream(self, i: int, timeout_s: float) -> None:
        prompt = f"stream {i}"
        request = generate_pb2.GenerateRequest(
            request_id=f"s{i}",
            adapter_id="a",
            prompt=prompt,
            stopping=generate_pb2.StoppingCriteria(max_new_tokens=self.tokens),
        )
        got: list[int] = []
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            call = self.stubs[i % len(self.stubs)].Generate(request, timeout=timeout_s)
            async for message in call:
                if not got:
                    self.first_tokens += 1
                    if self.first_tokens == self.streams:
                        self.all_first.set()
                self.messages += 1
                got.extend(message.token_ids)
            if got != expected_tokens("a", prompt, self.tokens):
                self.failed.append(f"s{i}: wrong tokens")
        except grpc.aio.AioRpcError as err:
            self.failed.append(f"s{i}: {err.code().name} {err.details()}")
        finally:
            self.open -= 1

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def _drive(
    router: str, router_pid: int, streams: int, tokens: int, delay_s: float, open_per_s: float
) -> dict:
    client = _Client(router, connections=max(1, streams // 100), tokens=tokens)
    client.streams = streams
    await client.stream(-1, 60)  # warm-up: channels connected, router code paths hot
    client.streams, client.first_tokens, client.messages = streams, 0, 0
    idle_rss = _rss_mib(router_pid)
    peak_rss = idle_rss
    cpu0, start = cpu_seconds(router_pid), time.monotonic()
    timeout_s = 120 + tokens * delay_s
    tasks = []
    for i in range(streams):
        tasks.append(asyncio.create_task(client.stream(i, timeout_s)))
        if i % 100 == 99:  # open them at about `open_per_s`, as clients arrive, not all at once
            await asyncio.sleep(100 / open_per_s)
    done = asyncio.gather(*tasks)
    first_at = cpu_first = None
    while not done.done():
        peak_rss = max(peak_rss, _rss_mib(router_pid))
        if first_at is None and client.all_first.is_set():
            first_at, cpu_first = time.monotonic(), cpu_seconds(router_pid)
            messages_at_first = client.messages
        await asyncio.sleep(0.25)
    await done
    seconds = time.monotonic() - start
    cpu_total = cpu_seconds(router_pid) - cpu0
    await client.close()
    result = {
        "streams": streams,
        "tokens_per_stream": tokens,
        "token_delay_s": delay_s,
        "client_connections": len(client.channels),
        "opened_per_s": open_per_s,
        "failed": len(client.failed),
        "failures_sample": client.failed[:5],
        "peak_concurrent_streams": client.peak_open,
        "messages": client.messages,
        "seconds": round(seconds, 1),
        "router_cpu_s": round(cpu_total, 2),
        "router_rss_idle_mib": round(idle_rss, 1),
        "router_rss_peak_mib": round(peak_rss, 1),
        "router_kib_per_stream": round((peak_rss - idle_rss) * 1024 / streams, 1),
    }
    if first_at is not None and cpu_first is not None:
        setup_cpu = cpu_first - cpu0
        rest_messages = client.messages - messages_at_first
        result |= {
            "seconds_to_all_first_tokens": round(first_at - start, 1),
            "router_cpu_s_to_all_first_tokens": round(setup_cpu, 2),
            "router_us_per_stream_setup": round(setup_cpu / streams * 1e6, 1),
            "router_us_per_message_after": round(
                (cpu_total - setup_cpu) / max(1, rest_messages) * 1e6, 1
            ),
        }
    return result


def run(
    streams: int = 10_000,
    shards: int = 4,
    tokens: int = 3,
    token_delay_s: float = 15.0,
    open_per_s: float = 500.0,
) -> dict[str, object]:
    """`streams` concurrent streams of `tokens` tokens through one router over `shards` fakes."""
    env = {**os.environ, "LORAFLEET_LOG_FORMAT": "json"}
    procs = []
    per_shard = math.ceil(streams / shards) + 64
    with tempfile.TemporaryDirectory(prefix="fleet-streams-") as tmp:
        workdir = Path(tmp)
        try:
            addresses = []
            for i in range(shards):
                port = free_port()
                cmd = [sys.executable, "-m", "tests.fake_shard", "--port", str(port)]
                cmd += ["--shard-id", f"fake-{i}", "--max-batch-size", str(per_shard)]
                cmd += ["--kv-pages", "100000000", "--token-delay-s", str(token_delay_s)]
                cmd += ["--coalesce"]
                launch(procs, workdir, f"fake{i}", None, cmd, env)
                addresses.append(f"127.0.0.1:{port}")
            router_port, metrics_port = free_port(), free_port()
            cmd = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--http-port=0"]
            cmd += ["--port", str(router_port), "--metrics-port", str(metrics_port)]
            cmd += [f"--shard={a}" for a in addresses]
            router = launch(procs, workdir, "router", None, cmd, env)
            address = f"127.0.0.1:{router_port}"
            require_serving(address, router)
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            while f"lorafleet_router_shards {shards}.0" not in _scrape(url):
                time.sleep(0.2)
            result = asyncio.run(
                _drive(address, router.pid, streams, tokens, token_delay_s, open_per_s)
            )
        finally:
            stop_all(procs)
    return {"shards": shards} | result


def _scrape(url: str) -> str:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return ""
