"""Every Prometheus metric of the shard (exported on `--metrics-port` at `/metrics`).

- `lorafleet_shard_requests_total{adapter,finish}` counter: requests that ended here, by adapter
  id (`<base>` for the base model) and how (`length`, `stop`, `eos`, `migrated`, `error`).
- `lorafleet_shard_generated_tokens_total{adapter}` counter: tokens generated, by adapter.
- `lorafleet_shard_step_seconds` histogram: wall time of one engine step (one forward + sampling).
- `lorafleet_shard_batch_size` histogram: requests in each forward.
- `lorafleet_shard_running` / `lorafleet_shard_queued` gauges: running batch and waiting requests.
- `lorafleet_shard_kv_pages_free` / `lorafleet_shard_kv_pages_total` gauges: KV page pool.
- `lorafleet_shard_adapters_resident` gauge: adapters in device memory.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BASE_MODEL_LABEL = "<base>"


class ShardMetrics:
    """One registry per engine, so tests can build many engines in one process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "lorafleet_shard_requests", "requests that ended", ["adapter", "finish"], registry=r
        )
        self.tokens = Counter(
            "lorafleet_shard_generated_tokens", "tokens generated", ["adapter"], registry=r
        )
        self.step_seconds = Histogram(
            "lorafleet_shard_step_seconds",
            "one engine step",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.batch_size = Histogram(
            "lorafleet_shard_batch_size",
            "requests per forward",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.running = Gauge("lorafleet_shard_running", "running batch size", registry=r)
        self.queued = Gauge("lorafleet_shard_queued", "waiting requests", registry=r)
        self.kv_free = Gauge("lorafleet_shard_kv_pages_free", "free KV pages", registry=r)
        self.kv_total = Gauge("lorafleet_shard_kv_pages_total", "KV pages in the pool", registry=r)
        self.adapters = Gauge(
            "lorafleet_shard_adapters_resident", "adapters in device memory", registry=r
        )

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)


def adapter_label(adapter_id: str) -> str:
    return adapter_id or BASE_MODEL_LABEL
