"""Scale-out rehearsal: `kubectl scale statefulset/lorafleet-shard --replicas=3`, on loopback.

A local DNS server plays the headless Service: one name whose A records are the shard "pods"
(127.0.0.2, .3, .4, all on one port, as pods share the container port). The router starts with one
real shard and a steady load; two more shards start and join the name while the load runs. The
router must place new requests on them once they are SERVING, with no failed or altered stream.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos import generate_pb2, generate_pb2_grpc
from router.local_process import free_port
from tests.fleet import wait_until
from tests.processes import shard_args, start, stop, wait_serving

pytestmark = pytest.mark.slow

NEW_TOKENS = 40
CLIENTS = 6
# Seconds any one wait of the test may take.
WAIT_S = 60.0


@dataclass
class Pod:
    """One shard process at its own loopback address, with its own metrics port."""

    host: str
    proc: subprocess.Popen
    log: Path
    metrics_port: int

    def finished_requests(self) -> float:
        """lorafleet_shard_requests_total summed over adapters and finish reasons."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        values = re.findall(r"^lorafleet_shard_requests_total\{.*\} (\S+)$", text, re.MULTILINE)
        return sum(map(float, values))


def pod_port() -> int:
    """A port free on every pod address (the A records carry no port: all pods share one)."""
    while True:
        port = free_port()
        try:
            for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue


def run(address: str, adapter: str, prompt: tuple[int, ...]) -> list[int]:
    request = generate_pb2.GenerateRequest(
        adapter_id=adapter,
        prompt_token_ids=generate_pb2.TokenIds(ids=prompt),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True),
    )
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        return [t for m in stub.Generate(request, timeout=60) for t in m.token_ids]


def test_shards_added_behind_the_dns_name_take_new_requests(tiny, dns, tmp_path):
    zone, dns_port = dns
    port = pod_port()
    pods: list[Pod] = []

    def start_pod(host: str) -> Pod:
        metrics_port = free_port()
        log = tmp_path / f"shard-{host}.log"
        flags = ["--host", host, "--max-batch-size=2", "--metrics-port", str(metrics_port)]
        pod = Pod(host, start(shard_args(tiny, port, *flags), log), log, metrics_port)
        pods.append(pod)
        return pod

    router_port = free_port()
    router_log = tmp_path / "router.log"
    router = None
    try:
        first = start_pod("127.0.0.2")
        wait_serving(f"127.0.0.2:{port}", first.proc, first.log)
        zone.publish("127.0.0.2")
        discovery = [f"--shard-dns={zone.name}:{port}", f"--dns-server=127.0.0.1:{dns_port}"]
        timing = ["--resolve-interval-s=0.2", "--queue-timeout-s=60", "--http-port=0"]
        router = start(
            ["router", "--host", "127.0.0.1", "--port", str(router_port), *discovery, *timing],
            router_log,
        )
        router_address = f"127.0.0.1:{router_port}"
        wait_serving(router_address, router, router_log)

        adapters = [*tiny.adapter_ids, ""]
        jobs = [(adapters[i % len(adapters)], (50 + i, 60, 70 + i)) for i in range(CLIENTS)]
        wait_until(lambda: _serves(router_address), "the router to see the first shard", WAIT_S)
        expected = {job: run(router_address, *job) for job in jobs}

        done: list[tuple[str, tuple[int, ...]]] = []
        errors: list[str] = []
        stop_load = threading.Event()

        def client(job: tuple[str, tuple[int, ...]]) -> None:
            while not stop_load.is_set():
                try:
                    tokens = run(router_address, *job)
                except grpc.RpcError as err:
                    errors.append(f"{job}: {err.code().name} {err.details()}")
                    continue
                if tokens != expected[job]:
                    errors.append(f"{job}: {tokens} != {expected[job]}")
                done.append(job)

        with ThreadPoolExecutor(CLIENTS) as pool:
            for job in jobs:
                pool.submit(client, job)
            try:
                wait_until(lambda: len(done) >= CLIENTS, "the load to run on one shard", WAIT_S)
                # Scale out: the new pods are published at once, before they have loaded, which
                # is harsher than Kubernetes (which lists only ready pods): the router must wait
                # for SERVING on its own.
                added = [start_pod(host) for host in ("127.0.0.3", "127.0.0.4")]
                for pod in added:
                    zone.publish(pod.host)
                for pod in added:
                    wait_serving(f"{pod.host}:{port}", pod.proc, pod.log)
                wait_until(
                    lambda: all(pod.finished_requests() >= 3 for pod in added),
                    "the new shards to finish requests",
                    WAIT_S,
                )
            finally:
                stop_load.set()

        assert not errors, errors[:3]
        assert len(done) > 3 * CLIENTS
        assert all(pod.proc.poll() is None for pod in pods)
        assert first.finished_requests() >= 1
    finally:
        if router is not None:
            stop(router)
        for pod in pods:
            stop(pod.proc)


def _serves(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            info = generate_pb2_grpc.GeneratorStub(channel).GetInfo(
                generate_pb2.GetInfoRequest(), timeout=2
            )
        except grpc.RpcError:
            return False
        return len(info.shards) >= 1
