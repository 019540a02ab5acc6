"""Serving a built shard over gRPC until a signal or an engine failure, then draining."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import grpc
import structlog
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generate_pb2_grpc, shard_pb2_grpc
from protos.decoding import InvalidArgumentOnDecodeError
from shard.config import ShardConfig
from shard.edge.health import HEALTH_SERVICE, NOT_SERVING, SERVER_OPTIONS, SERVICES, SERVING, bind
from shard.edge.server import GeneratorServicer, ShardService, ShardServicer
from shard.engine.engine import Engine

log = structlog.get_logger(__name__)


async def serve(cfg: ShardConfig, engine: Engine, service: ShardService) -> None:
    """Serves until SIGTERM/SIGINT or an engine failure, then drains and stops.

    Health (`""` and every service name move together): SERVING while new requests are taken,
    NOT_SERVING from the signal on (Kubernetes readiness fails, the router stops placing here)
    while running requests finish or migrate; the process then exits 0, or 1 if the engine died.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=(InvalidArgumentOnDecodeError(),))
    generate_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(service), server)
    shard_pb2_grpc.add_ShardServicer_to_server(ShardServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *SERVICES,
            HEALTH_SERVICE,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    bind(server, cfg)
    await server.start()
    if cfg.metrics_port is not None:
        engine.metrics.serve(cfg.metrics_port)
    engine.start()
    for name in ("", *SERVICES):
        await health_servicer.set(name, SERVING)
    log.info("serving", address=f"{cfg.host}:{cfg.port}", shard_id=cfg.shard_id)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set() and engine.alive:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)
    if not engine.alive:
        log.error("engine died: reporting NOT_SERVING and exiting", error=str(engine.failure))
    for name in ("", *SERVICES):
        await health_servicer.set(name, NOT_SERVING)
    await drain(cfg, engine)
    await server.stop(grace=2.0)
    engine.stop()
    if engine.failure is not None:
        raise SystemExit(1)


async def drain(cfg: ShardConfig, engine: Engine) -> None:
    """Lets running requests finish within the drain timeout, then migrates the rest."""
    engine.drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.drain_timeout_s
    while engine.alive and engine.load().running and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if engine.alive and engine.load().running:
        log.info("drain timeout: migrating the rest", running=engine.load().running)
        engine.evacuate()
        await asyncio.sleep(0.5)
    log.info("drained", running=engine.load().running)
