"""Starting local processes: a free loopback port for one, and waiting until it reports
grpc.health.v1 SERVING (the demo, the serving benchmark and the tests)."""

from __future__ import annotations

import socket
import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, proc: subprocess.Popen, timeout_s: float) -> str | None:
    """Polls the overall ("") health of `address` until SERVING: None then, else why it never
    got there (the process exited, or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"{address}: the process exited with {proc.returncode}"
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return None
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    return f"{address} did not serve within {timeout_s:.0f} s"
