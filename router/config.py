"""The router's one frozen configuration, built from flags with environment-variable defaults."""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class ConfigError(ValueError):
    """A flag or environment variable has a value the router cannot run with."""


class Policy(enum.Enum):
    """Placement rule for new requests (see `router.policy`)."""

    CONSOLIDATE = "consolidate"
    LEAST_LOADED = "least-loaded"


class LogFormat(enum.Enum):
    """How log lines are written; AUTO picks CONSOLE on a terminal and JSON otherwise."""

    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host and a TCP port; IPv6 hosts are kept without brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> Endpoint:
        """Parses `host:port` or `[v6-host]:port`; `what` names the flag in error messages."""
        host, sep, port_text = text.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port_text.isdigit():
            raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ConfigError(f"{what}: port {port} is outside 1..65535 in {text!r}")
        return cls(host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything the router process needs; built once in `__main__`, passed down explicitly."""

    # Static shard list; empty when shard_dns is set.
    shards: tuple[Endpoint, ...] = ()
    # DNS name (the shards' headless Service) and port, re-resolved every resolve_interval_s.
    shard_dns: Endpoint | None = None
    # DNS server asked directly for A records instead of the system resolver (tests).
    dns_server: Endpoint | None = None
    # Address the public Generator service listens on.
    host: str = "0.0.0.0"
    port: int = 50051
    policy: Policy = Policy.CONSOLIDATE
    # Make adapter residency the first placement key instead of the tie-break.
    residency_first: bool = False
    # Requests that may wait for room; one more gets RESOURCE_EXHAUSTED. 0 disables waiting.
    queue_size: int = 256
    # Seconds a request may wait for room before it fails (its own deadline may end it sooner).
    queue_timeout_s: float = 60.0
    # Prometheus HTTP port; None disables the exporter.
    metrics_port: int | None = None
    log_format: LogFormat = LogFormat.AUTO
    # Seconds between DNS resolutions.
    resolve_interval_s: float = 2.0
    # Seconds open streams get to finish after SIGTERM.
    shutdown_grace_s: float = 30.0
    # Times one request may move between shards before it fails with UNAVAILABLE.
    max_migrations: int = 8
    # Seconds after which the router asks a client connection to go away (HTTP/2 GOAWAY), so
    # clients reconnect and spread over router replicas as they scale; 0 keeps connections.
    max_connection_age_s: float = 300.0
    # Seconds streams open on a connection told to go away still get before it is closed.
    max_connection_age_grace_s: float = 600.0
    # Seconds between HTTP/2 keepalive pings on each shard channel, and how long a ping may go
    # unanswered before the channel counts as dead: a shard whose host vanished without closing
    # its connections fails its streams (which then migrate) within about their sum.
    shard_keepalive_s: float = 10.0
    shard_keepalive_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if bool(self.shards) == (self.shard_dns is not None):
            raise ConfigError("give either --shard HOST:PORT (repeatable) or --shard-dns NAME:PORT")
        if self.dns_server is not None and self.shard_dns is None:
            raise ConfigError("--dns-server only makes sense with --shard-dns")
        if len(set(self.shards)) != len(self.shards):
            raise ConfigError(f"--shard lists a shard twice: {', '.join(map(str, self.shards))}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is outside 1..65535")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ConfigError(f"--metrics-port {self.metrics_port} is outside 1..65535")
        if self.metrics_port == self.port:
            raise ConfigError(f"--metrics-port and --port are both {self.port}")
        for name, value in (
            ("--queue-size", self.queue_size),
            ("--shutdown-grace-s", self.shutdown_grace_s),
            ("--max-migrations", self.max_migrations),
        ):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.max_connection_age_s < 0:
            raise ConfigError(
                f"--max-connection-age-s must be >= 0 (0: never), got {self.max_connection_age_s}"
            )
        for name, value in (
            ("--queue-timeout-s", self.queue_timeout_s),
            ("--resolve-interval-s", self.resolve_interval_s),
            ("--max-connection-age-grace-s", self.max_connection_age_grace_s),
            ("--shard-keepalive-s", self.shard_keepalive_s),
            ("--shard-keepalive-timeout-s", self.shard_keepalive_timeout_s),
        ):
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")


def _env_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"LORAFLEET_RESIDENCY_FIRST: expected true/false, got {text!r}")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The `lorafleet-router` command line; every flag defaults to a LORAFLEET_* variable."""
    parser = argparse.ArgumentParser(
        prog="lorafleet-router",
        description="Place streaming Generate calls on lorafleet shards.",
    )

    def env_default(name: str, default: str | None) -> str | None:
        return env.get(name, default) or default

    parser.add_argument("--host", default=env_default("LORAFLEET_HOST", "0.0.0.0"))
    parser.add_argument("--port", default=env_default("LORAFLEET_PORT", "50051"))
    parser.add_argument(
        "--shard",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="a shard address (repeatable); default: LORAFLEET_SHARDS, comma separated",
    )
    parser.add_argument(
        "--shard-dns",
        default=None,
        metavar="NAME:PORT",
        help="DNS name resolving to every shard (a headless Service), re-resolved periodically; "
        "default: LORAFLEET_SHARD_DNS",
    )
    parser.add_argument(
        "--dns-server",
        default=env_default("LORAFLEET_DNS_SERVER", None),
        metavar="HOST:PORT",
        help="ask this DNS server for A records instead of the system resolver",
    )
    parser.add_argument(
        "--policy",
        default=env_default("LORAFLEET_POLICY", Policy.CONSOLIDATE.value),
        choices=[p.value for p in Policy],
    )
    parser.add_argument(
        "--residency-first",
        action="store_true",
        default=_env_bool(env.get("LORAFLEET_RESIDENCY_FIRST", "")),
        help="prefer shards holding the adapter before the busiest-fit rule",
    )
    parser.add_argument("--queue-size", default=env_default("LORAFLEET_QUEUE_SIZE", "256"))
    parser.add_argument("--queue-timeout-s", default=env_default("LORAFLEET_QUEUE_TIMEOUT_S", "60"))
    parser.add_argument("--metrics-port", default=env_default("LORAFLEET_METRICS_PORT", None))
    parser.add_argument(
        "--log-format",
        default=env_default("LORAFLEET_LOG_FORMAT", LogFormat.AUTO.value),
        choices=[f.value for f in LogFormat],
    )
    parser.add_argument(
        "--resolve-interval-s", default=env_default("LORAFLEET_RESOLVE_INTERVAL_S", "2")
    )
    parser.add_argument(
        "--shutdown-grace-s", default=env_default("LORAFLEET_SHUTDOWN_GRACE_S", "30")
    )
    parser.add_argument("--max-migrations", default=env_default("LORAFLEET_MAX_MIGRATIONS", "8"))
    parser.add_argument(
        "--max-connection-age-s",
        default=env_default("LORAFLEET_MAX_CONNECTION_AGE_S", "300"),
        help="send clients GOAWAY after this long so they spread over router replicas; 0: never",
    )
    parser.add_argument(
        "--max-connection-age-grace-s",
        default=env_default("LORAFLEET_MAX_CONNECTION_AGE_GRACE_S", "600"),
        help="how long open streams may run on a connection told to go away",
    )
    parser.add_argument(
        "--shard-keepalive-s",
        default=env_default("LORAFLEET_SHARD_KEEPALIVE_S", "10"),
        help="HTTP/2 keepalive ping interval on shard channels",
    )
    parser.add_argument(
        "--shard-keepalive-timeout-s",
        default=env_default("LORAFLEET_SHARD_KEEPALIVE_TIMEOUT_S", "5"),
        help="an unanswered keepalive ping fails the shard's calls after this long",
    )
    return parser


def _number(flag: str, text: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise ConfigError(f"{flag}: expected {expected}, got {text!r}") from None


def parse_config(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> RouterConfig:
    """Builds the config from `argv` (default: sys.argv) and `env` (default: os.environ).

    Raises ConfigError on any invalid value; argparse exits on unknown flags.
    """
    env = os.environ if env is None else env
    args = build_parser(env).parse_args(argv)
    shard_texts, dns_text = args.shard or [], args.shard_dns
    if not shard_texts and not dns_text:
        # Flags win over the environment as a pair, so a flag never clashes with a stale variable.
        shard_texts = [s for s in env.get("LORAFLEET_SHARDS", "").split(",") if s.strip()]
        dns_text = env.get("LORAFLEET_SHARD_DNS") or None
    return RouterConfig(
        shards=tuple(Endpoint.parse(s, "--shard") for s in shard_texts),
        shard_dns=Endpoint.parse(dns_text, "--shard-dns") if dns_text else None,
        dns_server=Endpoint.parse(args.dns_server, "--dns-server") if args.dns_server else None,
        host=args.host,
        port=int(_number("--port", args.port, int)),
        policy=Policy(args.policy),
        residency_first=args.residency_first,
        queue_size=int(_number("--queue-size", args.queue_size, int)),
        queue_timeout_s=float(_number("--queue-timeout-s", args.queue_timeout_s, float)),
        metrics_port=(
            None
            if args.metrics_port in (None, "", "0")
            else int(_number("--metrics-port", args.metrics_port, int))
        ),
        log_format=LogFormat(args.log_format),
        resolve_interval_s=float(_number("--resolve-interval-s", args.resolve_interval_s, float)),
        shutdown_grace_s=float(_number("--shutdown-grace-s", args.shutdown_grace_s, float)),
        max_migrations=int(_number("--max-migrations", args.max_migrations, int)),
        max_connection_age_s=float(
            _number("--max-connection-age-s", args.max_connection_age_s, float)
        ),
        max_connection_age_grace_s=float(
            _number("--max-connection-age-grace-s", args.max_connection_age_grace_s, float)
        ),
        shard_keepalive_s=float(_number("--shard-keepalive-s", args.shard_keepalive_s, float)),
        shard_keepalive_timeout_s=float(
            _number("--shard-keepalive-timeout-s", args.shard_keepalive_timeout_s, float)
        ),
    )


def server_options(config: RouterConfig) -> list[tuple[str, int]]:
    """gRPC options of the router's public server."""
    # Without so_reuseport = 0 a second process can silently bind the same port.
    options = [("grpc.so_reuseport", 0)]
    if config.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000)),
        ]
    return options


def shard_channel_options(config: RouterConfig) -> tuple[tuple[str, int], ...]:
    """gRPC options of every channel to a shard."""
    return (
        # Reconnect quickly: a restarted shard pod should take traffic within seconds, not
        # grpc's default two minutes of channel backoff.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", round(config.shard_keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(config.shard_keepalive_timeout_s * 1000)),
        # Any unanswered ping fails the connection this soon: when another ping (flow-control
        # probing) is in flight, grpc holds the keepalive ping back, and that other ping's own
        # timeout (a minute by default) would decide.
        ("grpc.http2.ping_timeout_ms", round(config.shard_keepalive_timeout_s * 1000)),
        # The router sends no data on its long WatchLoad streams; by default grpc stops pinging
        # after two pings without outgoing data, which would end the keepalive.
        ("grpc.http2.max_pings_without_data", 0),
    )
