"""The router's one frozen configuration, built from flags with environment-variable defaults."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protos.cli import EnvArgumentParser, LogFormat, float_range, int_range


class ConfigError(ValueError):
    """A flag or environment variable has a value the router cannot run with."""


class Policy(enum.Enum):
    """Placement rule for new requests (see `router.policy`)."""

    CONSOLIDATE = "consolidate"
    # Consolidation that fills the busy shards of a StatefulSet lowest ordinal first, so a
    # scale-in (which removes the highest ordinals) finds the shards that drained.
    CONSOLIDATE_ORDERED = "consolidate-ordered"
    LEAST_LOADED = "least-loaded"


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
    # Among shards the policy ranks equal, prefer one whose prefix cache holds the request's
    # prefix (shards report prefix keys in their load snapshots; `protos.prefix_key`).
    prefix_affinity: bool = True
    # Requests that may wait for room; one more gets RESOURCE_EXHAUSTED. 0 disables waiting.
    queue_size: int = 256
    # Seconds a request may wait for room before it fails (its own deadline may end it sooner).
    queue_timeout_s: float = 60.0
    # Prometheus HTTP port; None disables the exporter.
    metrics_port: int | None = None
    # Port of the OpenAI-compatible HTTP API (/v1/...) on `host`; None turns it off.
    http_port: int | None = 8000
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
        if self.http_port is not None and self.http_port in (self.port, self.metrics_port):
            raise ConfigError(
                f"--http-port {self.http_port} is also --port or --metrics-port: give each "
                "server its own port"
            )
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


def build_parser(env: Mapping[str, str]) -> EnvArgumentParser:
    """The `lorafleet-router` command line; every flag defaults to a LORAFLEET_* variable."""
    parser = EnvArgumentParser(
        prog="lorafleet-router",
        description="Place streaming Generate calls on lorafleet shards.",
        env=env,
    )
    port, count = int_range(1, 65535), int_range(0)
    seconds, positive_s = float_range(0.0), float_range(0.0, low_open=True)
    add = parser.add_env
    add("--host", "address to bind", "0.0.0.0")
    add("--port", "gRPC port of the public Generator service", 50051, type=port)
    parser.add_argument(
        "--shard",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="a shard address (repeatable; default: LORAFLEET_SHARDS, comma separated)",
    )
    parser.add_argument(
        "--shard-dns",
        default=None,
        metavar="NAME:PORT",
        help="DNS name resolving to every shard (a headless Service), re-resolved every "
        "--resolve-interval-s (default: LORAFLEET_SHARD_DNS); give this or --shard",
    )
    add(
        "--dns-server",
        "ask this DNS server (HOST:PORT) for A records (default: the system resolver)",
        metavar="HOST:PORT",
    )
    add("--policy", "placement rule", Policy.CONSOLIDATE.value, choices=[p.value for p in Policy])
    add(
        "--residency-first",
        "prefer shards holding the adapter before the busiest-fit rule",
        False,
        action="store_true",
    )
    add(
        "--prefix-affinity",
        "on: among shards the policy ranks equal (the same batch size), prefer one whose prefix "
        "cache holds the request's prefix; off: ignore prefixes",
        "on",
        choices=["on", "off"],
    )
    add(
        "--queue-size",
        "requests that may wait for a shard with room; 0: none wait",
        256,
        type=count,
    )
    add("--queue-timeout-s", "seconds a request may wait for room", 60.0, type=positive_s)
    add(
        "--metrics-port",
        "Prometheus /metrics port; 0: off (default: off)",
        type=int_range(0, 65535),
    )
    add(
        "--http-port",
        "port of the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
        "/v1/chat/completions); 0: off",
        8000,
        type=int_range(0, 65535),
    )
    add(
        "--log-format",
        "log lines: json, console, or auto (console on a terminal)",
        LogFormat.AUTO.value,
        choices=[f.value for f in LogFormat],
    )
    add(
        "--resolve-interval-s",
        "seconds between DNS resolutions of --shard-dns",
        2.0,
        type=positive_s,
    )
    add("--shutdown-grace-s", "on SIGTERM, seconds open streams get to finish", 30.0, type=seconds)
    add("--max-migrations", "times one request may move between shards", 8, type=count)
    add(
        "--max-connection-age-s",
        "send clients GOAWAY after this long so they spread over router replicas; 0: never",
        300.0,
        type=seconds,
    )
    add(
        "--max-connection-age-grace-s",
        "how long open streams may run on a connection told to go away",
        600.0,
        type=positive_s,
    )
    add(
        "--shard-keepalive-s",
        "HTTP/2 keepalive ping interval on shard channels",
        10.0,
        type=positive_s,
    )
    add(
        "--shard-keepalive-timeout-s",
        "an unanswered keepalive ping fails the shard's calls after this long",
        5.0,
        type=positive_s,
    )
    return parser


def parse_config(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> RouterConfig:
    """Builds the config from `argv` (default: sys.argv) and `env` (default: os.environ).

    A malformed flag or variable exits with a usage error (status 2); values that are well
    formed but cannot run together raise ConfigError.
    """
    env = os.environ if env is None else env
    args = build_parser(env).parse_args(argv)
    shards = tuple(Endpoint.parse(s, "--shard") for s in args.shard or [])
    dns = Endpoint.parse(args.shard_dns, "--shard-dns") if args.shard_dns else None
    if not shards and dns is None:
        # Flags win over the environment as a pair, so a flag never clashes with a stale variable.
        texts = [s for s in env.get("LORAFLEET_SHARDS", "").split(",") if s.strip()]
        shards = tuple(Endpoint.parse(s, "LORAFLEET_SHARDS") for s in texts)
        dns_text = env.get("LORAFLEET_SHARD_DNS", "").strip()
        dns = Endpoint.parse(dns_text, "LORAFLEET_SHARD_DNS") if dns_text else None
    return RouterConfig(
        shards=shards,
        shard_dns=dns,
        dns_server=Endpoint.parse(args.dns_server, "--dns-server") if args.dns_server else None,
        host=args.host,
        port=args.port,
        policy=Policy(args.policy),
        residency_first=args.residency_first,
        prefix_affinity=args.prefix_affinity == "on",
        queue_size=args.queue_size,
        queue_timeout_s=args.queue_timeout_s,
        metrics_port=args.metrics_port or None,
        http_port=args.http_port or None,
        log_format=LogFormat(args.log_format),
        resolve_interval_s=args.resolve_interval_s,
        shutdown_grace_s=args.shutdown_grace_s,
        max_migrations=args.max_migrations,
        max_connection_age_s=args.max_connection_age_s,
        max_connection_age_grace_s=args.max_connection_age_grace_s,
        shard_keepalive_s=args.shard_keepalive_s,
        shard_keepalive_timeout_s=args.shard_keepalive_timeout_s,
    )


# Calls the router's server lets wait for its event loop before refusing more (see server_options).
PENDING_CALLS = 10_000


def server_options(config: RouterConfig) -> list[tuple[str, int]]:
    """gRPC options of the router's public server."""
    # Without so_reuseport = 0 a second process can silently bind the same port.
    options = [("grpc.so_reuseport", 0)]
    # Calls that arrived but that the event loop has not picked up yet: past grpc's default soft
    # limit of 1,000 (hard 3,000) it refuses new ones at random, and their clients see a bare
    # CANCELLED (3,000 streams opened at once lost 8-22% that way, before any router code ran).
    # A burst must reach admission instead, whose queue bound answers RESOURCE_EXHAUSTED with
    # an actionable message; one router holds 10,000 streams.
    options += [
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
    ]
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
        # No bandwidth-delay probing: a shard's streams carry small messages (snapshots, tokens),
        # and each probe is a ping and its ack on every connection that received data.
        ("grpc.http2.bdp_probe", 0),
    )
