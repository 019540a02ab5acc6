"""`lorafleet-router`: builds the config, wires the router together and serves until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

import grpc
import structlog
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from protos import generate_pb2, generate_pb2_grpc
from protos.cli import configure_logging
from protos.decoding import InvalidArgumentOnDecodeError
from router.admission import Admission
from router.config import (
    ConfigError,
    Endpoint,
    RouterConfig,
    build_parser,
    parse_config,
    server_options,
    shard_channel_options,
)
from router.discovery import Discovery
from router.metrics import RouterMetrics
from router.openai_api.serve import HttpApi
from router.server import GeneratorService
from router.shard_table import ShardTable

log = structlog.get_logger("router")

GENERATOR_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Seconds between "no shard is serving" warnings while that lasts.
NO_SHARD_WARN_S = 5.0


async def serve(config: RouterConfig, metrics: RouterMetrics) -> None:
    """Runs the router until SIGTERM or SIGINT, then drains open streams for the grace period."""
    table = ShardTable(metrics, shard_channel_options(config), config.prefix_affinity)
    admission = Admission(
        table,
        config.policy,
        config.residency_first,
        config.queue_size,
        config.queue_timeout_s,
        metrics,
    )
    server = grpc.aio.server(
        options=server_options(config), interceptors=(InvalidArgumentOnDecodeError(),)
    )
    generator = GeneratorService(
        table, admission, metrics, config.max_migrations, config.prefix_affinity
    )
    generate_pb2_grpc.add_GeneratorServicer_to_server(generator, server)
    http = None
    if config.http_port is not None:
        # The OpenAI-compatible edge over the same service; bound first, so a taken port ends
        # the start before anything serves.
        http = HttpApi(generator, Endpoint(config.host, config.http_port), config.shutdown_grace_s)
        http.start()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (GENERATOR_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    server.add_insecure_port(str(Endpoint(config.host, config.port)))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await server.start()
    discovery = asyncio.create_task(Discovery(config, table).run(), name="discovery")
    watchdog = asyncio.create_task(warn_while_no_shard(table), name="no-shard watchdog")
    for service in ("", GENERATOR_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "router serving",
        address=str(Endpoint(config.host, config.port)),
        http=str(http.endpoint) if http else None,
        policy=config.policy.value,
        shards=[str(s) for s in config.shards],
        shard_dns=str(config.shard_dns) if config.shard_dns else None,
    )
    await stop.wait()

    log.info("router stopping", grace_s=config.shutdown_grace_s)
    await health.enter_graceful_shutdown()
    await asyncio.gather(server.stop(config.shutdown_grace_s), http.stop() if http else _nothing())
    for task in (discovery, watchdog):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await table.close()
    log.info("router stopped")


async def _nothing() -> None:
    return None


async def warn_while_no_shard(table: ShardTable, every_s: float = NO_SHARD_WARN_S) -> None:
    """Logs a warning every `every_s` while no shard serves (after start-up or losing them all),
    so an operator sees it before the first request times out."""
    while True:
        await asyncio.sleep(every_s)
        if not table.serving():
            known = table.addresses()
            log.warning(
                "no shard is serving: check the shards' health and --shard/--shard-dns",
                known=len(known),
                shards=known[:10],
            )


def main(argv: Sequence[str] | None = None) -> None:
    """Console script entry point."""
    try:
        config = parse_config(argv)
    except ConfigError as err:
        build_parser(os.environ).error(str(err))  # a usage error, as for a malformed flag
    configure_logging(config.log_format)
    metrics = RouterMetrics()
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port)
    # uvloop: each message crossing the router wakes the event loop from grpc's poller thread,
    # and uvloop's wake-up and task switches cost less CPU than asyncio's (issue 5).
    try:
        uvloop.run(serve(config, metrics))
    except ConfigError as err:
        sys.exit(f"lorafleet-router: {err}")


if __name__ == "__main__":
    main()
