"""The least a gRPC proxy in Python can do: the control that prices the router's own logic.

It forwards each `Generator.Generate` to one shard's `Shard.Generate` and writes the chunks back:
no placement, no accounting, no migration, no metrics, no logs. The benchmark's router-minus-
direct latency, less this proxy's, is what the router's logic costs over grpc's own hop.

With `--threads` it is the thread-based variant: grpc's sync server, one pool thread per stream,
and a shard call that completes on that thread (no hand-off from grpc's poller thread to an
event loop). It prices what moving the router off grpc.aio would buy (tried in session 6: the
router's own work on the thread ate the gain; benchmarks/NOTES.md).

    python -m benchmarks.passthrough_proxy --port 50052 --shard 127.0.0.1:50061 [--threads]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc
import grpc.experimental
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc


class Passthrough(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, shard: str):
        self._channel = grpc.aio.insecure_channel(shard)
        self._shard = shard_pb2_grpc.ShardStub(self._channel)

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Forwards the stream unchanged; a migration notice ends it (the tiny pool is roomy)."""
        call = self._shard.Generate(shard_pb2.ShardGenerateRequest(request=request))
        async for message in call:
            if message.HasField("chunk"):
                await context.write(message.chunk)


class ThreadedPassthrough(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, shard: str):
        options = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
        self._shard = shard_pb2_grpc.ShardStub(grpc.insecure_channel(shard, options=options))

    def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generate_pb2.GenerateResponse]:
        """Forwards the stream on this pool thread; a client cancel cancels the shard call."""
        call = self._shard.Generate(shard_pb2.ShardGenerateRequest(request=request))
        context.add_callback(call.cancel)
        for message in call:
            if message.HasField("chunk"):
                yield message.chunk


def serve_threads(port: int, shard: str) -> None:
    # Enough threads for every stream the benchmark keeps open at once.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=256), options=[("grpc.so_reuseport", 0)]
    )
    generate_pb2_grpc.add_GeneratorServicer_to_server(ThreadedPassthrough(shard), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1.0).wait()


async def serve(port: int, shard: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    generate_pb2_grpc.add_GeneratorServicer_to_server(Passthrough(shard), server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--shard", required=True, help="HOST:PORT")
    parser.add_argument("--threads", action="store_true", help="grpc's sync server instead")
    args = parser.parse_args(argv)
    if args.threads:
        serve_threads(args.port, args.shard)
        return
    # The router's event loop, so that router minus this proxy prices the router's logic only.
    uvloop.run(serve(args.port, args.shard))


if __name__ == "__main__":
    main()
