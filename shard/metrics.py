"""Every Prometheus metric of the shard (exported on `--metrics-port` at `/metrics`).

- `lorafleet_shard_requests_total{adapter,finish}` counter: requests that ended here, by adapter
  id (`<base>` for the base model) and how (`length`, `stop`, `eos`, `migrated`, `error`).
- `lorafleet_shard_generated_tokens_total{adapter}` counter: tokens generated, by adapter.
- `lorafleet_shard_step_seconds` histogram: wall time of one engine step (one forward + sampling).
- `lorafleet_shard_batch_size` histogram: requests in each forward.
- `lorafleet_shard_running` / `lorafleet_shard_queued` gauges: running batch and waiting requests.
- `lorafleet_shard_kv_pages_free` / `lorafleet_shard_kv_pages_total` gauges: KV page pool.
- `lorafleet_shard_adapters_resident` gauge: adapters in device memory.
- `lorafleet_shard_idle_seconds` gauge: seconds since a request last ran or waited here (0 while
  one does; from the shard's start if none ever did): the scale-in signal.
- `lorafleet_shard_adapter_lookups_total{tier,result}` counter: each request's adapter looked up
  tier by tier (`gpu`, then `host`, then `disk`) until a `hit`; every tier before it is a `miss`.
- `lorafleet_shard_adapter_load_seconds{stage}` histogram: one load step, `disk_to_host` (read,
  validate, slice, pin) or `host_to_gpu` (the side-stream copy, as seen by the engine).
- `lorafleet_shard_adapter_load_time_seconds{adapter}` summary: load time by adapter (both stages).
- `lorafleet_shard_adapter_queue_seconds{adapter}` summary: arrival to admission, by adapter.
- `lorafleet_shard_adapter_evictions_total{tier}` counter: adapters dropped to make room.
- `lorafleet_shard_adapter_bytes{tier}` gauge: bytes of adapters held in `gpu` and `host` memory.
- `lorafleet_shard_prefix_lookups_total{adapter,result}` counter: admissions that looked up the
  prefix cache, by adapter id and whether at least one block was found (`hit`) or not (`miss`).
- `lorafleet_shard_prefix_prompt_tokens_total{adapter}` / `lorafleet_shard_prefix_hit_tokens_total
  {adapter}` counters: tokens of those admissions, and how many of them came from the cache (their
  ratio is the hit rate in tokens).
- `lorafleet_shard_prefix_cached_pages` gauge: KV pages the prefix cache keeps (held or idle);
  `lorafleet_shard_prefix_idle_pages` gauge: those no request holds (reclaimable, counted free).
- `lorafleet_shard_prefix_evicted_pages_total` / `lorafleet_shard_prefix_retired_pages_total`
  counters: cached pages reclaimed for allocations (LRU), and dropped with a replaced adapter
  version.
- `lorafleet_shard_decode_graphs` gauge: decode CUDA graphs captured (at start by
  `--graph-warmup`, then on first use of a shape that was not warmed).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    start_http_server,
)

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
        # Children by adapter label, each incremented once per step by its step's tokens: labels()
        # and inc() per token are locked, about 3 us each, 0.1 ms of host time per step at batch
        # 32; the map grows exactly as the exported series do.
        self._token_counts: dict[str, Counter] = {}
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
        # The engine sets its function: idleness grows between load changes.
        self.idle_seconds = Gauge(
            "lorafleet_shard_idle_seconds",
            "seconds since a request last ran or waited here (0 while one does)",
            registry=r,
        )
        self.adapter_lookups = Counter(
            "lorafleet_shard_adapter_lookups",
            "adapter cache hits and misses by tier",
            ["tier", "result"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "lorafleet_shard_adapter_load_seconds",
            "adapter load latency by stage",
            ["stage"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        # Summaries (count and sum, no buckets): one series pair per adapter stays cheap.
        self.adapter_load_time = Summary(
            "lorafleet_shard_adapter_load_time_seconds",
            "adapter load time by adapter",
            ["adapter"],
            registry=r,
        )
        self.adapter_queue_seconds = Summary(
            "lorafleet_shard_adapter_queue_seconds",
            "arrival to admission by adapter",
            ["adapter"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            "lorafleet_shard_adapter_evictions", "adapters evicted", ["tier"], registry=r
        )
        self.adapter_bytes = Gauge(
            "lorafleet_shard_adapter_bytes", "adapter bytes held", ["tier"], registry=r
        )
        self.prefix_lookups = Counter(
            "lorafleet_shard_prefix_lookups",
            "admissions that looked up the prefix cache",
            ["adapter", "result"],
            registry=r,
        )
        self.prefix_prompt_tokens = Counter(
            "lorafleet_shard_prefix_prompt_tokens",
            "prompt tokens of admissions that looked up the prefix cache",
            ["adapter"],
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "lorafleet_shard_prefix_hit_tokens",
            "prompt tokens found in the prefix cache",
            ["adapter"],
            registry=r,
        )
        self.prefix_cached_pages = Gauge(
            "lorafleet_shard_prefix_cached_pages", "KV pages the prefix cache keeps", registry=r
        )
        self.prefix_idle_pages = Gauge(
            "lorafleet_shard_prefix_idle_pages",
            "cached KV pages no request holds (reclaimable)",
            registry=r,
        )
        self.prefix_evicted_pages = Counter(
            "lorafleet_shard_prefix_evicted_pages",
            "cached KV pages reclaimed for allocations",
            registry=r,
        )
        self.prefix_retired_pages = Counter(
            "lorafleet_shard_prefix_retired_pages",
            "cached KV pages dropped with a replaced adapter version",
            registry=r,
        )
        self.decode_graphs = Gauge(
            "lorafleet_shard_decode_graphs", "decode CUDA graphs captured", registry=r
        )

    def tokens_generated(self, adapter_ids: Iterable[str]) -> None:
        """Counts one generated token per id in `adapter_ids` ("" for the base model)."""
        for adapter_id, count in collections.Counter(adapter_ids).items():
            label = adapter_label(adapter_id)
            counter = self._token_counts.get(label)
            if counter is None:
                counter = self._token_counts[label] = self.tokens.labels(label)
            counter.inc(count)

    def prefix_lookup(self, adapter_key: str, hit_tokens: int, prompt_tokens: int) -> None:
        """One admission's prefix lookup; `adapter_key` is `id@version` ("" the base model),
        labelled by id alone (a label per version would grow with every reload)."""
        label = adapter_label(adapter_key.partition("@")[0])
        self.prefix_lookups.labels(label, "hit" if hit_tokens else "miss").inc()
        self.prefix_prompt_tokens.labels(label).inc(prompt_tokens)
        self.prefix_hit_tokens.labels(label).inc(hit_tokens)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)


def adapter_label(adapter_id: str) -> str:
    return adapter_id or BASE_MODEL_LABEL
