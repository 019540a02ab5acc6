"""Every Prometheus metric of the router, in one registry per process.

Names and meaning (all exported on `--metrics-port` at `/metrics`):

- `lorafleet_router_requests_total{adapter,status}` counter: Generate calls that ended, by adapter
  id (`<base>` for the base model; `<unknown>` unless a shard admitted the call, so made-up ids
  cannot grow the series without bound) and gRPC status name (`OK`, `CANCELLED`, ...).
- `lorafleet_router_queue_time_seconds` histogram: time a request waited in the router's queue
  for a shard with room (0 when one fitted at once; summed over re-placements).
- `lorafleet_router_time_to_first_token_seconds` histogram: arrival at the router to the first
  token forwarded to the client.
- `lorafleet_router_inter_token_latency_seconds` histogram: time between consecutive messages
  forwarded to the client, divided by the tokens in the later one.
- `lorafleet_router_migrations_total{reason}` counter: requests moved to another shard; reason is
  `kv_exhausted`, `draining` (the shard said so) or `shard_failed` (UNAVAILABLE, dropped
  connection, or a stream that ended without a finish reason).
- `lorafleet_router_queue_depth` gauge: requests waiting in the router's queue now.
- `lorafleet_router_shards` gauge: shards eligible for placement now (SERVING, live snapshot).
- `lorafleet_router_shard_running{shard}` gauge: running batch size of each shard (last snapshot).
- `lorafleet_router_shard_kv_pages_used{shard}` gauge: KV pages in use on each shard (last
  snapshot: total - free).
- `lorafleet_router_shard_idle_seconds{shard}` gauge: how long each eligible shard has had
  nothing running, queued or dispatched to it (the shard's own count, carried on; 0 otherwise).
- `lorafleet_router_shards_idle` gauge: eligible shards with nothing running, queued or
  dispatched: capacity a scale-in could release.
- `lorafleet_router_prefix_placements_total{result}` counter: placements of requests with a
  prefix key (prefix affinity on, input longer than the key's head): `held` when the shard
  placed on reported the key, `not_held` when it did not (no shard held it, or only shards the
  policy ranked lower).
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BASE_MODEL_LABEL = "<base>"
UNKNOWN_ADAPTER_LABEL = "<unknown>"

# Seconds; from sub-millisecond routing decisions up to long queues and slow prefills.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def adapter_label(adapter_id: str, known: bool) -> str:
    """The `adapter` label value of a request; `known`: a shard admitted it, so the adapter
    exists (labels exist only for real adapters: bounded cardinality)."""
    if not adapter_id:
        return BASE_MODEL_LABEL
    return adapter_id if known else UNKNOWN_ADAPTER_LABEL


class RouterMetrics:
    """The router's metrics; one instance per process, its own registry (tests run many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorafleet_router_requests",
            "Generate calls that ended, by adapter and gRPC status.",
            ["adapter", "status"],
            registry=r,
        )
        # Labelled children by (adapter, status): labels() takes a lock and builds a key on
        # every call; this map grows exactly as the exported series do.
        self._request_counts: dict[tuple[str, str], Counter] = {}
        self.queue_time = Histogram(
            "lorafleet_router_queue_time_seconds",
            "Seconds a request waited in the router's queue for a shard with room.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "lorafleet_router_time_to_first_token_seconds",
            "Seconds from arrival at the router to the first token forwarded.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "lorafleet_router_inter_token_latency_seconds",
            "Seconds between forwarded tokens of one stream.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.migrations = Counter(
            "lorafleet_router_migrations",
            "Requests moved to another shard, by reason.",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "lorafleet_router_queue_depth",
            "Requests waiting in the router's queue.",
            registry=r,
        )
        self.shards = Gauge(
            "lorafleet_router_shards",
            "Shards eligible for placement.",
            registry=r,
        )
        self.shard_running = Gauge(
            "lorafleet_router_shard_running",
            "Running batch size of each shard (last snapshot).",
            ["shard"],
            registry=r,
        )
        self.shard_kv_pages_used = Gauge(
            "lorafleet_router_shard_kv_pages_used",
            "KV pages in use on each shard (last snapshot).",
            ["shard"],
            registry=r,
        )
        self.shard_idle_seconds = Gauge(
            "lorafleet_router_shard_idle_seconds",
            "Seconds each eligible shard has had nothing running, queued or dispatched.",
            ["shard"],
            registry=r,
        )
        self.shards_idle = Gauge(
            "lorafleet_router_shards_idle",
            "Eligible shards with nothing running, queued or dispatched.",
            registry=r,
        )
        self.prefix_placements = Counter(
            "lorafleet_router_prefix_placements",
            "Placements of requests with a prefix key, by whether the shard held the prefix.",
            ["result"],
            registry=r,
        )
        self.prefix_held = self.prefix_placements.labels("held")
        self.prefix_not_held = self.prefix_placements.labels("not_held")

    def request_ended(self, adapter_id: str, status: str, known: bool) -> None:
        """Counts a Generate call that ended with `status` (a gRPC code name); `known`: a shard
        admitted it."""
        key = (adapter_label(adapter_id, known), status)
        counter = self._request_counts.get(key)
        if counter is None:
            counter = self._request_counts[key] = self.requests.labels(*key)
        counter.inc()

    def forget_shard(self, shard: str) -> None:
        """Drops the per-shard series of a shard that left the table."""
        for gauge in (self.shard_running, self.shard_kv_pages_used, self.shard_idle_seconds):
            with contextlib.suppress(KeyError):
                gauge.remove(shard)

    def serve(self, port: int) -> None:
        """Exports the registry over HTTP on `port` (a daemon thread)."""
        start_http_server(port, registry=self.registry)
