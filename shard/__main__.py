"""`lorafleet-shard`: load the base model, build the KV cache and engine, serve gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import grpc
import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from router.config import LogFormat
from router.logs import configure_logging
from shard.adapter_cache import AdapterCache
from shard.config import ShardConfig, parse_config
from shard.engine import Engine
from shard.kv_cache import KvCache
from shard.loader import build_model, load_tokenizer
from shard.model_config import load_model_config
from shard.model_runner import ModelRunner
from shard.parallel import SINGLE, TPGroup
from shard.scheduler import Scheduler
from shard.server import GeneratorServicer, ShardService, ShardServicer

log = structlog.get_logger("shard")

SERVICES = (
    generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name,
    shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name,
)


def plan_kv_pages(cfg: ShardConfig, page_bytes: int, device: torch.device, max_context: int) -> int:
    """KV pool size: the flag, or the configured share of free device memory minus the adapter
    budget; on CPU, room for a full batch at full context."""
    if cfg.kv_pages is not None:
        return cfg.kv_pages
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * cfg.kv_memory_fraction) - cfg.adapter_memory_mb * 2**20
        return max(1, budget // page_bytes)
    return -(-cfg.max_batch_size * max_context // cfg.page_size)


def build_engine(cfg: ShardConfig, group: TPGroup) -> tuple[Engine, ShardService]:
    """Loads everything one rank needs and wires the engine."""
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    model_cfg = load_model_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(model_cfg, cfg.model, group, dtype, device)
    max_context = model_cfg.max_position_embeddings
    page_bytes = KvCache.bytes_per_page(model_cfg, group, cfg.page_size, dtype)
    pages = plan_kv_pages(cfg, page_bytes, device, max_context)
    kv = KvCache(model_cfg, group, pages, cfg.page_size, dtype, device)
    adapters = AdapterCache(
        cfg.adapters,
        model_cfg,
        group,
        dtype,
        device,
        cfg.adapter_memory_mb * 2**20,
        cfg.max_lora_rank,
    )
    runner = ModelRunner(model, kv, adapters.weights, cfg.max_lora_rank, device)
    scheduler = Scheduler(
        kv.pool, cfg.page_size, cfg.max_batch_size, cfg.max_prefill_tokens, adapters
    )
    engine = Engine(
        scheduler,
        runner.forward,
        tokenizer,
        model_cfg.eos_token_ids,
        max_context,
        cfg.max_queue,
    )
    service = ShardService(
        engine, adapters, tokenizer, model_cfg, cfg.shard_id, group.size, max_context
    )
    log.info(
        "shard ready",
        model=model_cfg.name,
        device=cfg.device,
        dtype=cfg.dtype,
        kv_pages=pages,
        page_size=cfg.page_size,
        max_context=max_context,
    )
    return engine, service


async def serve(cfg: ShardConfig, engine: Engine, service: ShardService) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    generate_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(service), server)
    shard_pb2_grpc.add_ShardServicer_to_server(ShardServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *SERVICES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    if server.add_insecure_port(f"{cfg.host}:{cfg.port}") == 0:
        raise SystemExit(f"cannot bind {cfg.host}:{cfg.port}")
    await server.start()
    engine.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", *SERVICES):
        await health_servicer.set(name, serving)
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
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *SERVICES):
        await health_servicer.set(name, not_serving)
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
        engine.evacuate()
        await asyncio.sleep(0.5)
    log.info("drained", running=engine.load().running)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    configure_logging(LogFormat(cfg.log_format))
    torch.set_grad_enabled(False)
    engine, service = build_engine(cfg, SINGLE)
    asyncio.run(serve(cfg, engine, service))


if __name__ == "__main__":
    main()
