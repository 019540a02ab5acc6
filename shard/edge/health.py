"""The shard's health service names and the health server that answers while the weights load."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generate_pb2, shard_pb2
from shard.config import ShardConfig

log = structlog.get_logger(__name__)

SERVICES = (
    generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name,
    shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name,
)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


def bind(server: grpc.Server | grpc.aio.Server, cfg: ShardConfig) -> None:
    """Listens on the shard's address; a taken port ends the process with a clear message."""
    address = f"{cfg.host}:{cfg.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:
        raise SystemExit(f"cannot bind {address}: {err}") from err
    if port == 0:
        raise SystemExit(f"cannot bind {address}")


@contextlib.contextmanager
def loading_health(cfg: ShardConfig) -> Iterator[None]:
    """Answers grpc.health.v1 with NOT_SERVING on the serving port while the weights load.

    Probes, routers and grpcurl see a loading shard instead of a refused connection, and a taken
    port fails before minutes of loading. The full server takes the port over once this closes.
    """
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    servicer = health.HealthServicer()
    for name in ("", *SERVICES):
        servicer.set(name, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection((HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    bind(server, cfg)
    server.start()
    log.info("loading", address=f"{cfg.host}:{cfg.port}", shard_id=cfg.shard_id)
    try:
        yield
    finally:
        servicer.enter_graceful_shutdown()
        server.stop(grace=None).wait()
