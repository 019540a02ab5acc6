"""Statistics of the serving benchmark: what a client saw of each request, percentiles,
summaries per target, and the latency each proxy adds to a run's shard-direct arm."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Outcome:
    """What the client saw of one request; times in seconds from its send."""

    adapter_id: str
    # When it was sent, in seconds from the start of the run, and its scheduled time.
    sent_s: float = 0.0
    scheduled_s: float = 0.0
    # One entry per received token; tokens of one message share its arrival time.
    token_times: list[float] = field(default_factory=list)
    end_s: float = 0.0
    error: str | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread_ms(values: Sequence[float]) -> dict[str, float]:
    """p50, p90 and p99 of seconds, in milliseconds."""
    return {f"p{q}": round(percentile(values, q) * 1000, 3) for q in (50, 90, 99)}


def ttfts(outcomes: Sequence[Outcome]) -> list[float]:
    """First-token times of the requests that succeeded and got a token."""
    return [o.token_times[0] for o in outcomes if o.error is None and o.token_times]


def summarize(outcomes: Sequence[Outcome], duration_s: float) -> dict:
    """Throughput and latency percentiles (milliseconds) of finished requests."""
    done = [o for o in outcomes if o.error is None]
    lag_s = max((o.sent_s - o.scheduled_s for o in outcomes), default=0.0)
    itl = [b - a for o in done for a, b in itertools.pairwise(o.token_times)]
    tokens = sum(len(o.token_times) for o in done)
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {
        "requests": len(outcomes),
        "ok": len(done),
        "errors": errors,
        "duration_s": round(duration_s, 3),
        "requests_per_s": round(len(done) / duration_s, 3),
        "output_tokens_per_s": round(tokens / duration_s, 1),
        "ttft_ms": spread_ms(ttfts(done)),
        "itl_ms": spread_ms(itl),
        "e2e_ms": spread_ms([o.end_s for o in done]),
        # How late the generator sent requests: large values mean the client, not the server,
        # limited the load.
        "send_lag_ms_max": round(lag_s * 1000, 3),
    }


def median_difference_ci(
    base: Sequence[float], other: Sequence[float], level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Bootstrap interval of median(other) - median(base), each sample resampled on its own.

    The open loop's TTFTs spread over a whole decode step, so a p50 difference from a few hundred
    requests carries an error of a good part of a millisecond; this says how much.
    """
    rng = random.Random(0)
    diffs = sorted(
        statistics.median(rng.choices(other, k=len(other)))
        - statistics.median(rng.choices(base, k=len(base)))
        for _ in range(resamples)
    )
    tail = (1 - level) / 2
    return diffs[int(tail * (resamples - 1))], diffs[int((1 - tail) * (resamples - 1))]


def open_loop_report(arms: dict[str, list[Outcome]], duration_s: float) -> dict:
    """Each arm's summary, and what every arm after the first (the shard, straight) adds to its
    TTFT, ITL and end-to-end percentiles, with a 95% bootstrap interval on the TTFT p50."""
    base_name, *others = arms
    report = {name: summarize(outcomes, duration_s) for name, outcomes in arms.items()}
    firsts = {name: ttfts(outcomes) for name, outcomes in arms.items()}
    for name in others:
        added = {
            metric: {
                q: round(report[name][metric][q] - report[base_name][metric][q], 3)
                for q in report[base_name][metric]
            }
            for metric in ("ttft_ms", "itl_ms", "e2e_ms")
        }
        low, high = median_difference_ci(firsts[base_name], firsts[name])
        added["ttft_ms"]["p50_ci95"] = [round(low * 1000, 3), round(high * 1000, 3)]
        report[name.replace("through_", "") + "_added_ms"] = added
    return report
