"""`lorafleet-router`: builds the config, wires the router together and serves until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from concurrent import futures

import grpc
import structlog
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generate_pb2, generate_pb2_grpc
from router.admission import Admission
from router.config import (
    ConfigError,
    Endpoint,
    RouterConfig,
    parse_config,
    server_options,
    shard_channel_options,
)
from router.discovery import Discovery
from router.logs import configure_logging
from router.metrics import RouterMetrics
from router.policy import RULES
from router.server import GeneratorService
from router.shards import ShardTable

log = structlog.get_logger("router")

GENERATOR_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


async def serve(config: RouterConfig, metrics: RouterMetrics) -> None:
    """Runs the router until SIGTERM or SIGINT, then drains open streams for the grace period.

    The event loop (this thread) runs the control plane: discovery, the shards' load and health
    watches, the wait queue. The public server is grpc's sync server, whose pool threads carry
    the Generate streams (router/server.py says why).
    """
    loop = asyncio.get_running_loop()
    table = ShardTable(metrics, shard_channel_options(config))
    admission = Admission(
        table,
        RULES[config.policy],
        config.residency_first,
        config.queue_size,
        config.queue_timeout_s,
        metrics,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_streams, thread_name_prefix="rpc"),
        options=server_options(config),
        maximum_concurrent_rpcs=config.max_streams,
    )
    generate_pb2_grpc.add_GeneratorServicer_to_server(
        GeneratorService(table, admission, metrics, config.max_migrations, loop), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (GENERATOR_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    server.add_insecure_port(str(Endpoint(config.host, config.port)))

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    server.start()
    discovery = asyncio.create_task(Discovery(config, table).run(), name="discovery")
    for service in ("", GENERATOR_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "router serving",
        address=str(Endpoint(config.host, config.port)),
        policy=config.policy.value,
        shards=[str(s) for s in config.shards],
        shard_dns=str(config.shard_dns) if config.shard_dns else None,
    )
    await stop.wait()

    log.info("router stopping", grace_s=config.shutdown_grace_s)
    health_servicer.enter_graceful_shutdown()
    # The loop keeps running meanwhile: draining streams may still queue or migrate.
    stopped = server.stop(config.shutdown_grace_s)
    await loop.run_in_executor(None, stopped.wait)
    discovery.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await discovery
    await table.close()
    log.info("router stopped")


def main(argv: Sequence[str] | None = None) -> None:
    """Console script entry point."""
    try:
        config = parse_config(argv)
    except ConfigError as err:
        sys.exit(f"lorafleet-router: {err}")
    configure_logging(config.log_format)
    metrics = RouterMetrics()
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port)
    # uvloop: the control plane's watches wake the event loop from grpc's poller thread for
    # every snapshot, and uvloop's wake-up and task switches cost less CPU than asyncio's.
    uvloop.run(serve(config, metrics))


if __name__ == "__main__":
    main()
