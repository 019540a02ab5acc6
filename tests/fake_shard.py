"""A pure-Python stand-in for a shard, for router tests: deterministic tokens, scripted failures.

Run as `python -m tests.fake_shard --host H --port P` (port 0 picks one). It serves
`lorafleet.v1.Shard`, `lorafleet.v1.Generator` (ListAdapters, GetInfo) and health, and prints one
JSON event per line on stdout (`listening`, `start`, `cancelled`, `done`) for tests to read.

Token i of a completion is `expected_tokens(adapter_id, prompt, n)[i]`, wherever it is generated.
Words in the prompt script the first leg of a request (ignored when it resumes):
`migrate@K` / `drain@K` end the stream after K tokens with a migration notice (KV_EXHAUSTED /
DRAINING), `abort@K` aborts with UNAVAILABLE after K tokens, `error:CODE` aborts at once with that
status code. The word `poison` aborts every leg with UNAVAILABLE after one token, as a request
that crashes each shard it reaches would. SIGTERM or Drain makes running streams migrate
(DRAINING) at their next token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
import zlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from shard.edge.load_feed import EVERY_CHANGE, LoadFeed, load_updates, pacing

VOCAB = 32000
DEFAULT_MAX_NEW_TOKENS = 16


def expected_tokens(adapter_id: str, prompt: str, count: int) -> list[int]:
    """The completion the fake produces for (adapter, prompt), whatever the shard."""
    seed = zlib.crc32(f"{adapter_id}\0{prompt}".encode())
    return [(seed + 7919 * i) % VOCAB for i in range(count)]


def token_text(token_id: int) -> str:
    """Text of one token."""
    return f" t{token_id}"


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def _directive(prompt: str, name: str) -> int | None:
    for word in prompt.split():
        if word.startswith(f"{name}@"):
            return int(word.split("@", 1)[1])
    return None


class FakeShard(shard_pb2_grpc.ShardServicer, generate_pb2_grpc.GeneratorServicer):
    """Shard and Generator services of the fake; load is derived from the open streams."""

    def __init__(self, args: argparse.Namespace, health: health_aio.HealthServicer):
        self.args = args
        self.health = health
        self.shard_id = args.shard_id
        self.adapters = [a for a in args.adapters.split(",") if a]
        self.resident = {a for a in args.resident.split(",") if a}
        self.pages: dict[str, int] = {}
        self.draining = False
        self.sequence = 0
        # Bumped on every change; WatchLoad streams through the shard's own feed, pushing
        # every change at once (no coalescing gap: router tests see each one).
        self.feed = LoadFeed()

    def snapshot(self) -> shard_pb2.LoadSnapshot:
        self.sequence += 1
        return shard_pb2.LoadSnapshot(
            shard_id=self.shard_id,
            sequence=self.sequence,
            running=len(self.pages),
            max_batch_size=self.args.max_batch_size,
            kv_pages_free=max(0, self.args.kv_pages - sum(self.pages.values())),
            kv_pages_total=self.args.kv_pages,
            kv_page_size=self.args.page_size,
            adapters_resident=sorted(self.resident),
            draining=self.draining,
            tp_size=1,
            max_context=4096,
        )

    async def notify(self) -> None:
        self.feed.changed()

    async def WatchLoad(self, request, context):
        """Snapshot now, on every change, and at least every second."""
        pace = pacing(request) if self.args.coalesce else EVERY_CHANGE
        async for message in load_updates(self.feed, self.snapshot, request.residency_deltas, pace):
            yield message

    async def Generate(self, request, context):
        """Deterministic tokens every `--token-delay-s`; resumes exactly; scripted failures."""
        req = request.request
        prompt = req.prompt
        resumed = list(request.resume.generated_token_ids)
        emit(
            "start",
            shard=self.shard_id,
            request_id=req.request_id,
            adapter_id=req.adapter_id,
            resumed=len(resumed),
            migrations=request.resume.migrations,
            deadline_s=context.time_remaining(),
        )
        if req.adapter_id and req.adapter_id not in self.adapters:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"adapter {req.adapter_id!r} not under the root"
            )
        for word in prompt.split():
            if word.startswith("error:"):
                await context.abort(grpc.StatusCode[word[6:]], f"scripted {word[6:]}")
        total = req.stopping.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        tokens = expected_tokens(req.adapter_id, prompt, total)
        if resumed != tokens[: len(resumed)]:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "resumed tokens diverge")
        first_leg = not request.HasField("resume")
        script = {
            name: _directive(prompt, name) if first_leg else None
            for name in ("migrate", "drain", "abort")
        }
        key = req.request_id
        self.pages[key] = math.ceil((len(prompt.encode()) + len(resumed) + 1) / self.args.page_size)
        if req.adapter_id:
            self.resident.add(req.adapter_id)
        await self.notify()
        sent = 0
        ended = False  # the stream's last message is on its way
        try:
            for position in range(len(resumed), total):
                if script["migrate"] == sent or script["drain"] == sent or self.draining:
                    reason = (
                        shard_pb2.MIGRATION_REASON_KV_EXHAUSTED
                        if script["migrate"] == sent
                        else shard_pb2.MIGRATION_REASON_DRAINING
                    )
                    ended = True
                    yield shard_pb2.ShardGenerateResponse(
                        migration=shard_pb2.Migration(
                            reason=reason, generated_token_ids=tokens[:position]
                        )
                    )
                    emit("migrated", shard=self.shard_id, request_id=key, at=position)
                    return
                if script["abort"] == sent or ("poison" in prompt.split() and sent == 1):
                    # abort@N fails the first leg only; a "poison" request fails every shard.
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: shard lost")
                await asyncio.sleep(self.args.token_delay_s)
                last = position == total - 1
                chunk = generate_pb2.GenerateResponse(
                    token_ids=[tokens[position]], text=token_text(tokens[position])
                )
                if last:
                    chunk.finish_reason = generate_pb2.FINISH_REASON_LENGTH
                    chunk.usage.prompt_tokens = len(prompt.split())
                    chunk.usage.generated_tokens = total
                    chunk.usage.migrations = request.resume.migrations
                ended = last
                yield shard_pb2.ShardGenerateResponse(chunk=chunk)
                sent += 1
                self.pages[key] = math.ceil(
                    (len(prompt.encode()) + position + 2) / self.args.page_size
                )
            emit("done", shard=self.shard_id, request_id=key)
        except (asyncio.CancelledError, GeneratorExit):
            # A call that ends while the handler waits between tokens cancels it; one that ends
            # while it is suspended at a yield closes the generator instead (GeneratorExit). After
            # the last message either is just the caller hanging up, not a cancellation.
            if not ended:
                emit("cancelled", shard=self.shard_id, request_id=key, sent=sent)
            raise
        finally:
            self.pages.pop(key, None)
            await self.notify()

    async def Drain(self, request, context):
        """Stops new work: health NOT_SERVING, running streams migrate at their next token."""
        running = len(self.pages)
        self.draining = True
        for service in ("", "lorafleet.v1.Shard", "lorafleet.v1.Generator"):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.notify()
        return shard_pb2.DrainResponse(running=running)

    async def ListAdapters(self, request, context):
        """Every adapter of the fake, GPU-resident ones marked so."""
        residency = generate_pb2.ADAPTER_RESIDENCY_GPU
        return generate_pb2.ListAdaptersResponse(
            adapters=[
                generate_pb2.AdapterInfo(
                    adapter_id=a,
                    residency=residency
                    if a in self.resident
                    else generate_pb2.ADAPTER_RESIDENCY_DISK,
                )
                for a in self.adapters
            ]
        )

    async def GetInfo(self, request, context):
        """A fixed description of the fake model."""
        return generate_pb2.GetInfoResponse(
            model="fake-llama", max_context=4096, shards=[self.shard_id], vocab_size=VOCAB
        )


async def serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health = health_aio.HealthServicer()
    fake = FakeShard(args, health)
    shard_pb2_grpc.add_ShardServicer_to_server(fake, server)
    generate_pb2_grpc.add_GeneratorServicer_to_server(fake, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if not args.shard_id:
        fake.shard_id = f"{args.host}:{port}"
    await server.start()
    for service in ("", "lorafleet.v1.Shard", "lorafleet.v1.Generator"):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    emit("listening", port=port, shard=fake.shard_id)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await fake.Drain(None, None)
    await server.stop(2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--shard-id", default="")
    parser.add_argument("--adapters", default="a,b,c")
    parser.add_argument("--resident", default="")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--kv-pages", type=int, default=1000)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--token-delay-s", type=float, default=0.01)
    parser.add_argument(
        "--coalesce",
        action="store_true",
        help="space snapshots as the watcher asks, like a real shard (default: push each change)",
    )
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
