"""`lorafleet`: a command-line client of the Generator service (router or shard)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc

from protos import generate_pb2, generate_pb2_grpc

DEFAULT_TARGET = "localhost:50051"


def build_parser() -> argparse.ArgumentParser:
    """The `lorafleet` command line; --target defaults to LORAFLEET_TARGET."""
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    target = os.environ.get("LORAFLEET_TARGET") or DEFAULT_TARGET
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("--target", default=target, metavar="HOST:PORT")
    gen.add_argument("--adapter", default="", help="adapter id; empty means the base model")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--top-p", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.add_argument("prompt")

    adapters = commands.add_parser("adapters", help="list adapters and where they reside")
    adapters.add_argument("--target", default=target, metavar="HOST:PORT")

    info = commands.add_parser("info", help="describe the base model and the shards")
    info.add_argument("--target", default=target, metavar="HOST:PORT")
    return parser


def generate_request(args: argparse.Namespace) -> generate_pb2.GenerateRequest:
    """The GenerateRequest of a `generate` command line."""
    sampling = generate_pb2.SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
    )
    if args.seed is not None:
        sampling.seed = args.seed
    return generate_pb2.GenerateRequest(
        adapter_id=args.adapter,
        prompt=args.prompt,
        sampling=sampling,
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=args.max_new_tokens, stop=args.stop),
    )


def _generate(stub: generate_pb2_grpc.GeneratorStub, args: argparse.Namespace) -> None:
    for message in stub.Generate(generate_request(args), timeout=args.timeout):
        sys.stdout.write(message.text)
        sys.stdout.flush()
        if message.finish_reason:
            usage = message.usage
            reason = generate_pb2.FinishReason.Name(message.finish_reason)
            print(file=sys.stdout)
            print(
                f"[{reason.removeprefix('FINISH_REASON_').lower()}: {usage.prompt_tokens} prompt + "
                f"{usage.generated_tokens} generated tokens, first token after "
                f"{usage.time_to_first_token_s * 1000:.0f} ms, {usage.migrations} migrations]",
                file=sys.stderr,
            )


def _adapters(stub: generate_pb2_grpc.GeneratorStub) -> None:
    reply = stub.ListAdapters(generate_pb2.ListAdaptersRequest(), timeout=10)
    rows = [("ADAPTER", "SHARD", "RESIDENCY", "RANK")]
    for a in sorted(reply.adapters, key=lambda a: (a.adapter_id, a.shard)):
        residency = generate_pb2.AdapterResidency.Name(a.residency)
        rows.append(
            (a.adapter_id, a.shard, residency.removeprefix("ADAPTER_RESIDENCY_"), str(a.rank))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _info(stub: generate_pb2_grpc.GeneratorStub) -> None:
    info = stub.GetInfo(generate_pb2.GetInfoRequest(), timeout=10)
    print(f"model        {info.model}")
    print(f"max context  {info.max_context}")
    print(f"vocab size   {info.vocab_size}")
    print(f"shards       {', '.join(info.shards)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console script entry point; exits 1 with the gRPC status on failure."""
    args = build_parser().parse_args(argv)
    with grpc.insecure_channel(args.target) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        try:
            if args.command == "generate":
                _generate(stub, args)
            elif args.command == "adapters":
                _adapters(stub)
            else:
                _info(stub)
        except grpc.RpcError as err:
            sys.exit(f"lorafleet: {err.code().name}: {err.details()}")
        except KeyboardInterrupt:
            sys.exit(130)


if __name__ == "__main__":
    main()
