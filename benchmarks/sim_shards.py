"""Many simulated shards behind one port: every WatchLoad stream is a shard of its own.

    python -m benchmarks.sim_shards --port P --changes-per-s 6

The router dials each shard at a different loopback address (127.0.x.y:P, all on this one
listener), so it holds one channel, one load stream and one health watch per simulated shard,
as it would against a real fleet. Each load stream's shard changes its batch at Poisson times
(`--changes-per-s`) and swaps a resident adapter on one change in twenty; its snapshots go out
through the shard's own `shard.edge.load_feed` (pushed on change, coalesced, heartbeats, residency
deltas when the router asks). Every second it prints `{"snapshots": N}` (sent so far) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from protos import shard_pb2, shard_pb2_grpc
from shard.edge.load_feed import LoadFeed, load_updates, pacing

MAX_BATCH = 32
KV_PAGES = 2048


def loopback_addresses(count: int, port: int) -> list[str]:
    """`count` distinct loopback addresses on `port` (127.0.0.0/8 all reaches this host)."""
    return [f"127.0.{1 + i // 250}.{1 + i % 250}:{port}" for i in range(count)]


class SimulatedShards(shard_pb2_grpc.ShardServicer):
    def __init__(self, changes_per_s: float, adapters: int, seed: int, full_residency: bool):
        self.changes_per_s = changes_per_s
        self.full_residency = full_residency
        self.adapters = adapters
        self.rng = random.Random(seed)
        self.sent = 0
        self.streams = 0

    async def WatchLoad(self, request, context):
        self.streams += 1
        rng = random.Random(self.rng.random())
        feed = LoadFeed()
        shard_id = f"lorafleet-shard-{self.streams - 1}"
        state = {"running": rng.randint(0, MAX_BATCH)}
        resident = sorted({f"adapter-{rng.randrange(self.adapters)}" for _ in range(8)})

        def snapshot() -> shard_pb2.LoadSnapshot:
            running = state["running"]
            return shard_pb2.LoadSnapshot(
                shard_id=shard_id,
                running=running,
                max_batch_size=MAX_BATCH,
                kv_pages_free=KV_PAGES - 40 * running,
                kv_pages_total=KV_PAGES,
                kv_page_size=16,
                adapters_resident=resident,
                tp_size=1,
                max_context=4096,
            )

        async def change() -> None:
            while self.changes_per_s > 0:
                await asyncio.sleep(rng.expovariate(self.changes_per_s))
                step = 1 if state["running"] == 0 else rng.choice((-1, 1))
                state["running"] = min(MAX_BATCH, state["running"] + step)
                if rng.random() < 0.05:
                    resident[rng.randrange(len(resident))] = (
                        f"adapter-{rng.randrange(self.adapters)}"
                    )
                    resident.sort()
                feed.changed()

        changer = asyncio.create_task(change())
        try:
            async for message in load_updates(
                feed,
                snapshot,
                request.residency_deltas and not self.full_residency,
                pacing(request),
            ):
                self.sent += 1
                yield message
        finally:
            changer.cancel()


async def report(shards: SimulatedShards) -> None:
    while True:
        print(json.dumps({"snapshots": shards.sent, "streams": shards.streams}), flush=True)
        await asyncio.sleep(1.0)


async def serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    shards = SimulatedShards(args.changes_per_s, args.adapters, args.seed, args.full_residency)
    health = health_aio.HealthServicer()
    shard_pb2_grpc.add_ShardServicer_to_server(shards, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"0.0.0.0:{args.port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await report(shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--changes-per-s", type=float, default=6.0, help="per simulated shard")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--full-residency", action="store_true", help="list every adapter in every snapshot"
    )
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
