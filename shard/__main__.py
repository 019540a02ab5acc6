"""`lorafleet-shard`: load the base model, build the KV cache and engine, serve gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from protos.decoding import InvalidArgumentOnDecodeError
from router.config import LogFormat
from router.logs import configure_logging
from shard.config import ShardConfig, parse_config
from shard.edge.chat_template import load_chat_template
from shard.edge.server import GeneratorServicer, ShardService, ShardServicer
from shard.engine.engine import Engine
from shard.engine.executor import LocalExecutor
from shard.engine.prefix_cache import PrefixCache
from shard.engine.scheduler import Scheduler
from shard.model.config import ModelConfigError
from shard.parallel.group import TPGroup, init_group
from shard.parallel.rank import (
    Leader,
    RankState,
    build_rank,
    follower_main,
    rank_device,
    shutdown_group,
)

log = structlog.get_logger("shard")

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


def build_engine(cfg: ShardConfig, group: TPGroup) -> tuple[Engine, ShardService, Leader]:
    """Loads rank 0's slice of everything and wires the engine and the gRPC service; a lost
    tensor-parallel rank kills the engine."""
    state = build_rank(cfg, group)
    leader = Leader(state, heartbeat_s=min(1.0, cfg.tp_timeout_s / 4))
    model_cfg = state.model_cfg
    max_context = model_cfg.max_context
    scheduler = Scheduler(
        state.kv.pool,
        cfg.page_size,
        cfg.max_batch_size,
        cfg.max_prefill_tokens,
        state.adapters,
        prefix_cache(cfg, state) if cfg.prefix_cache else None,
    )
    engine = Engine(
        scheduler,
        leader if group.size > 1 else LocalExecutor(state.runner),
        state.tokenizer,
        model_cfg.eos_token_ids,
        max_context,
        cfg.max_queue,
    )
    if (graphs := state.runner.decode_graphs) is not None:
        # Read at scrape time: captures on first use happen on the engine thread.
        engine.metrics.decode_graphs.set_function(lambda: graphs.captured)
    service = ShardService(
        engine,
        state.adapters,
        state.tokenizer,
        model_cfg,
        cfg.shard_id,
        group.size,
        max_context,
        load_chat_template(cfg.model, state.tokenizer),
    )
    log.info(
        "shard ready",
        model=model_cfg.name,
        architecture=model_cfg.architecture,
        device=cfg.device,
        dtype=cfg.dtype,
        tp=group.size,
        kv_pages=state.kv.pool.total,
        page_size=cfg.page_size,
        max_context=max_context,
        # A windowed model (Mistral) is served up to its window: past it, requests are refused.
        sliding_window=model_cfg.sliding_window,
    )
    leader.start(on_lost=engine.fail)
    return engine, service, leader


def prefix_cache(cfg: ShardConfig, state: RankState) -> PrefixCache:
    """The prefix cache over the KV pool; a replaced or evicted adapter version retires its
    blocks."""
    adapters = state.adapters
    cache = PrefixCache(
        state.kv.pool, cfg.page_size, lambda key: not key or adapters.is_current(key)
    )
    adapters.on_retired(cache.retire)
    return cache


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


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    configure_logging(LogFormat(cfg.log_format))
    torch.set_grad_enabled(False)
    followers = spawn_followers(cfg)
    try:
        with loading_health(cfg):
            group = init_group(0, cfg.tp, rank_device(cfg, TPGroup(0, cfg.tp)), cfg.tp_timeout_s)
            engine, service, leader = build_engine(cfg, group)
    except ModelConfigError as err:
        # The folder passed the checks of parse_config, but its weights do not fit its config.
        log.error("the model folder cannot be served", error=str(err))
        raise SystemExit(f"lorafleet-shard: {err}") from None
    try:
        asyncio.run(serve(cfg, engine, service))
    finally:
        shutdown_group(leader, followers)


def spawn_followers(cfg: ShardConfig) -> list[mp.process.BaseProcess]:
    """Starts ranks 1..tp-1 (unless torchrun started them) with an env:// rendezvous."""
    if cfg.tp == 1:
        return []
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=follower_main, args=(cfg, r), daemon=True) for r in range(1, cfg.tp)
    ]
    for proc in procs:
        proc.start()
    return procs


if __name__ == "__main__":
    main()
