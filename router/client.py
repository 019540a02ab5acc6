"""`lorafleet`: a command-line client of the Generator service (router or shard)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

import grpc

from protos import generate_pb2, generate_pb2_grpc
from protos.cli import EnvArgumentParser, float_range, int_range
from router.config import ConfigError, Endpoint

DEFAULT_TARGET = "localhost:50051"


def _target(text: str) -> str:
    try:
        return str(Endpoint.parse(text, "target"))
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser(env: Mapping[str, str] | None = None) -> EnvArgumentParser:
    """The `lorafleet` command line; --target defaults to LORAFLEET_TARGET."""
    env = os.environ if env is None else env
    parser = EnvArgumentParser(prog="lorafleet", description=__doc__, env=env)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> EnvArgumentParser:
        sub: EnvArgumentParser = commands.add_parser(name, help=help, description=help, env=env)
        sub.add_env(
            "--target", "router or shard address", DEFAULT_TARGET, type=_target, metavar="HOST:PORT"
        )
        return sub

    gen = command("generate", "stream a completion to the terminal")
    gen.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    gen.add_argument(
        "--max-new-tokens",
        type=int_range(0),
        default=0,
        metavar="N",
        help="most tokens to generate (default: 0, up to the model's context "
        "limit, as the API does)",
    )
    gen.add_argument(
        "--temperature",
        type=float_range(0.0),
        default=0.0,
        metavar="T",
        help="softmax temperature (default: 0, greedy)",
    )
    gen.add_argument(
        "--top-p",
        type=float_range(0.0, 1.0),
        default=0.0,
        metavar="P",
        help="nucleus sampling mass (default: 0, off)",
    )
    gen.add_argument(
        "--top-k",
        type=int_range(0),
        default=0,
        metavar="K",
        help="sample among the K likeliest tokens (default: 0, off)",
    )
    gen.add_argument(
        "--repetition-penalty",
        type=float_range(0.0),
        default=0.0,
        metavar="R",
        help="penalty on tokens already seen (default: 0, off)",
    )
    gen.add_argument(
        "--seed",
        type=int_range(0),
        default=None,
        help="seed of the request's random stream (default: random)",
    )
    gen.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop string, repeatable (default: none)",
    )
    gen.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past the end-of-sequence token (default: off)",
    )
    gen.add_argument(
        "--timeout",
        type=float_range(0.0, low_open=True),
        default=None,
        metavar="SECONDS",
        help="deadline of the call (default: none)",
    )
    gen.add_argument("prompt", help="prompt text, or - to read it from standard input")
    command("adapters", "list adapters and where they reside")
    command("info", "describe the base model and the shards")
    return parser


def read_prompt(text: str, stdin: TextIO) -> str:
    """The prompt argument; `-` reads all of standard input instead."""
    return stdin.read() if text == "-" else text


def generate_request(args: argparse.Namespace) -> generate_pb2.GenerateRequest:
    """The GenerateRequest of a `generate` command line."""
    sampling = generate_pb2.SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )
    if args.seed is not None:
        sampling.seed = args.seed
    return generate_pb2.GenerateRequest(
        adapter_id=args.adapter,
        prompt=args.prompt,
        sampling=sampling,
        stopping=generate_pb2.StoppingCriteria(
            max_new_tokens=args.max_new_tokens, stop=args.stop, ignore_eos=args.ignore_eos
        ),
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
            (
                a.adapter_id,
                a.shard,
                residency.removeprefix("ADAPTER_RESIDENCY_"),
                str(a.rank) if a.rank else "?",  # 0: its adapter_config.json is unreadable
            )
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
    if args.command == "generate":
        args.prompt = read_prompt(args.prompt, sys.stdin)
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
