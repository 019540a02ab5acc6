"""What the fleet simulation (`fleet_sim`) simulates: the fleet and its traffic, and the time
one shard's decode step takes, fitted to lorafleet's measured steps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepModel:
    """Seconds of one decode step, fitted to lorafleet's measured 7B decode steps on an H200.

    textgen_h200.json (decode forward, context 272): batch 1 5.15 ms; batch 32 identical 6.82,
    distinct 7.72; batch 64 identical 8.82, distinct 10.11. A line in batch plus a cost per
    distinct adapter (least squares over the eight distinct and identical rows) fits all within
    4%. Prefill: at batch 32 distinct, serving with prompts of
    64-256 tokens ran at 2481 tok/s against 3521 decode-only: 13 ms more per request of 160
    prompt tokens, 0.083 ms a prompt token. An r16 7B adapter copies host to GPU in 1.45 ms.
    """

    base_ms: float = 5.07
    per_row_ms: float = 0.0578
    per_adapter_ms: float = 0.0223
    prefill_ms_per_token: float = 0.083
    adapter_load_ms: float = 1.45

    def step_s(self, batch: int, distinct: int) -> float:
        ms = self.base_ms + self.per_row_ms * batch + self.per_adapter_ms * max(0, distinct - 1)
        return ms / 1000


@dataclass(frozen=True, slots=True)
class Fleet:
    """The simulated fleet and its traffic."""

    shards: int = 100
    duration_s: float = 600.0
    # Arrivals per second at the top of the ramp (the middle of the run).
    peak_rate: float = 1000.0
    adapters: int = 1000
    zipf_exponent: float = 1.1
    prompt_tokens: tuple[int, int] = (64, 512)
    output_tokens: tuple[int, int] = (64, 512)
    max_batch: int = 32
    # 7B bf16 on an H200 after weights and graphs (textgen_h200.json: 13,264 pages of 16).
    kv_pages: int = 13264
    page_size: int = 16
    adapters_per_shard: int = 16
    # The router's queue bound (--queue-size): past it a request is refused. Above the default
    # (256) so the peak, which exceeds what the fleet serves, queues instead of being refused.
    queue_size: int = 10_000
    sample_every_s: float = 1.0
    # A shard idle this long counts as releasable.
    release_after_s: float = 60.0
    seed: int = 0
