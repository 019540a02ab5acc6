"""Punica's cluster experiment, simulated: a fleet of GPU shards behind the router's placement.

A discrete-event simulation. Requests arrive as a Poisson process whose rate ramps up linearly
to a peak and back down (Punica's Fig. 13 run), each for one of many adapters with Zipf
popularity, with seeded prompt and output lengths. Every arrival goes through the router's own
admission (`router.admission.Admission` and its placement index, which agrees with
`router.policy`'s rules) over a simulated shard table (`fleet_sim_router`): placed at once when
nobody waits and a shard fits, else queued FCFS (bounded by `Fleet.queue_size`) and served
whenever a shard frees room. The router sees each shard's exact load (no snapshot lag). The
fleet, its traffic and the step times are `fleet_model`'s.

Each simulated shard runs continuous batching: every decode step emits one token for every
running request and takes `StepModel.step_s(batch, distinct adapters)`, fitted to lorafleet's
measured decode steps (`results/textgen_h200.json`, 7B shape, bf16, CUDA graphs); a joining
request stalls its shard's batch for its prefill (per prompt token) and, if its adapter is not
resident, for the adapter's host-to-GPU copy (`results/adapters_h200.json`). KV pages grow with
every token; a shard whose pool runs out migrates its newest request, which the router places
again (as the real router does on KV_EXHAUSTED). Shards hold a fixed number of adapters, LRU.

Reported per policy: GPU time full / partial / idle, the mean batch, queueing, migrations, and
shards that could be released (idle for a whole window), including those a StatefulSet
scale-in would remove (the highest ordinals) without touching a busy one.
"""

from __future__ import annotations

import bisect
import collections
import functools
import heapq
import itertools
import math
import random

from benchmarks.fleet_model import Fleet, StepModel
from benchmarks.fleet_sim_router import SimTable
from router.admission import Admission, QueueFull
from router.config import Policy
from router.metrics import RouterMetrics
from router.policy import Demand, ShardLoad
from router.shards import Reservation


class _Request:
    __slots__ = ("adapter", "arrived", "finish", "id", "output", "prompt", "queued_s")

    def __init__(self, rid: int, adapter: str, prompt: int, output: int, arrived: float):
        self.id = rid
        self.adapter = adapter
        self.prompt = prompt
        self.output = output  # tokens still to generate
        self.arrived = arrived
        self.finish = 0.0  # shard progress at which its last token comes out
        self.queued_s = 0.0


class _Shard:
    """One GPU: progress counts decode steps; requests finish at a progress mark."""

    __slots__ = (
        "busy_since",
        "idle_since",
        "in_batch",
        "name",
        "ordinal",
        "progress",
        "resident",
        "resident_set",
        "running",
        "state_since",
        "updated",
        "version",
    )

    def __init__(self, ordinal: int):
        self.ordinal = ordinal
        self.name = f"lorafleet-shard-{ordinal}"
        self.running: list[tuple[float, int, _Request]] = []  # heap by finish
        self.in_batch: collections.Counter[str] = collections.Counter()
        self.resident: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.resident_set: frozenset[str] = frozenset()
        self.progress = 0.0
        self.updated = 0.0
        self.version = 0
        self.idle_since: float | None = 0.0
        self.state_since = 0.0
        self.busy_since = 0.0


class Simulation:
    """One run of `fleet` under one placement policy."""

    def __init__(self, fleet: Fleet, policy: Policy, model: StepModel | None = None):
        """`model`: the step times (None: the fit to the measured steps)."""
        self.fleet = fleet
        self.policy = policy
        self.model = model if model is not None else StepModel()
        self.rng = random.Random(fleet.seed)
        self.shards = [_Shard(i) for i in range(fleet.shards)]
        self.table = SimTable()
        for shard in self.shards:
            self.table.add(shard.name, shard)
        self.admission = Admission(
            self.table,
            policy,
            residency_first=False,
            queue_size=fleet.queue_size,
            queue_timeout_s=math.inf,
            metrics=RouterMetrics(),
        )
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.now = 0.0
        weights = [1 / (r + 1) ** fleet.zipf_exponent for r in range(fleet.adapters)]
        total = sum(weights)
        self.cum_weights = list(itertools.accumulate(w / total for w in weights))
        # Time-weighted accounting: seconds per state, and batch-seconds.
        self.state_s = {"full": 0.0, "partial": 0.0, "idle": 0.0}
        self.batch_s = 0.0
        self.samples: list[list[int]] = []
        self.sample_times: list[float] = []
        self.releasable: list[int] = []
        self.releasable_top: list[int] = []
        self.arrivals = self.completed = self.migrations = self.rejected = 0
        self.queue_waits: list[float] = []
        self.max_queue = 0
        for shard in self.shards:
            self._publish(shard, notify=False)

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, object]:
        f = self.fleet
        self._push(self._next_arrival(0.0), 0, None)
        self._push(0.0, 2, None)
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if now > f.duration_s:
                break
            self.now = now
            if kind == 0:
                self._arrive(now)
            elif kind == 1:
                shard, version = payload  # type: ignore[misc]
                if version == shard.version:
                    self._depart(shard, now)
            else:
                self._sample(now)
        end = f.duration_s
        for shard in self.shards:
            self._account(shard, end)
        return self._report()

    def _push(self, when: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, payload))

    def _next_arrival(self, now: float) -> float:
        """Thinning: a Poisson process at the peak rate, kept with probability rate(t)/peak."""
        f = self.fleet
        t = now
        while True:
            t += self.rng.expovariate(f.peak_rate)
            ramp = 1 - abs(2 * t / f.duration_s - 1)
            if t > f.duration_s or self.rng.random() < ramp:
                return t

    def _arrive(self, now: float) -> None:
        f = self.fleet
        rng = self.rng
        self.arrivals += 1
        adapter = f"adapter-{_pick(self.cum_weights, rng.random())}"
        request = _Request(
            self.arrivals,
            adapter,
            rng.randint(*f.prompt_tokens),
            rng.randint(*f.output_tokens),
            now,
        )
        reservation = self.admission.place_now(Demand(request.adapter, request.prompt))
        if reservation is not None:
            self._placed(request, reservation)
        else:
            self._wait(request, resumed=False)
        nxt = self._next_arrival(now)
        if nxt <= f.duration_s:
            self._push(nxt, 0, None)

    def _wait(self, request: _Request, resumed: bool) -> None:
        try:
            self.admission.wait(
                Demand(request.adapter, request.prompt),
                functools.partial(self._placed, request),
                resumed,
            )
        except QueueFull:
            self.rejected += 1
        self.max_queue = max(self.max_queue, self.admission.depth)

    def _placed(self, request: _Request, reservation: Reservation) -> bool:
        """Admission placed the request (now, or from its queue when a shard freed room)."""
        self._join(reservation.handle.shard, request, self.now)  # type: ignore[attr-defined]
        return True

    # -- shard dynamics ---------------------------------------------------------------------------
    def _step_s(self, shard: _Shard) -> float:
        return self.model.step_s(len(shard.running), len(shard.in_batch))

    def _advance(self, shard: _Shard, now: float) -> None:
        if shard.running:
            shard.progress += (now - shard.updated) / self._step_s(shard)
        shard.updated = now

    def _join(self, shard: _Shard, request: _Request, now: float) -> None:
        self._advance(shard, now)
        self._account(shard, now)
        request.queued_s += now - request.arrived
        self.queue_waits.append(request.queued_s)
        stall_ms = self.model.prefill_ms_per_token * request.prompt
        if request.adapter not in shard.resident:
            stall_ms += self.model.adapter_load_ms
        self._make_resident(shard, request.adapter)
        request.finish = shard.progress + request.output
        heapq.heappush(shard.running, (request.finish, request.id, request))
        shard.in_batch[request.adapter] += 1
        # The prefill holds the whole batch back: every running request finishes that much later.
        shard.progress -= stall_ms / 1000 / self._step_s(shard)
        # Placing reserves: admission's index learns of the join without serving its queue.
        self._changed(shard, now, notify=False)

    def _depart(self, shard: _Shard, now: float) -> None:
        self._advance(shard, now)
        self._account(shard, now)
        while shard.running and shard.running[0][0] <= shard.progress + 1e-9:
            _, _, request = heapq.heappop(shard.running)
            self._leave(shard, request)
            self.completed += 1
        self._changed(shard, now, notify=True)

    def _leave(self, shard: _Shard, request: _Request) -> None:
        shard.in_batch[request.adapter] -= 1
        if not shard.in_batch[request.adapter]:
            del shard.in_batch[request.adapter]

    def _pages_used(self, shard: _Shard) -> int:
        page = self.fleet.page_size
        used = 0
        for finish, _, request in shard.running:
            generated = max(0.0, request.output - (finish - shard.progress))
            used += math.ceil((request.prompt + generated + 1) / page)
        return used

    def _changed(self, shard: _Shard, now: float, notify: bool) -> None:
        """KV check (migrating the newest while the pool is over), then the router's view."""
        while shard.running and self._pages_used(shard) > self.fleet.kv_pages:
            newest = max(shard.running, key=lambda entry: entry[2].arrived)
            shard.running.remove(newest)
            heapq.heapify(shard.running)
            request = newest[2]
            self._leave(shard, request)
            generated = int(max(0.0, request.output - (request.finish - shard.progress)))
            request.prompt += generated  # resumes with its tokens so far
            request.output -= generated
            request.arrived = now
            self.migrations += 1
            self._wait(request, resumed=True)
        shard.version += 1
        if shard.running:
            when = now + (shard.running[0][0] - shard.progress) * self._step_s(shard)
            self._push(max(now, when), 1, (shard, shard.version))
            shard.idle_since = None
        elif shard.idle_since is None:
            shard.idle_since = now
        self._publish(shard, notify)

    def _make_resident(self, shard: _Shard, adapter: str) -> None:
        if adapter in shard.resident:
            shard.resident.move_to_end(adapter)
            return
        shard.resident[adapter] = None
        while len(shard.resident) > self.fleet.adapters_per_shard:
            victim = next((a for a in shard.resident if a not in shard.in_batch), None)
            if victim is None:
                break
            del shard.resident[victim]
        shard.resident_set = frozenset(shard.resident)

    def _publish(self, shard: _Shard, notify: bool) -> None:
        f = self.fleet
        used = self._pages_used(shard) if shard.running else 0
        self.table.publish(
            ShardLoad(
                shard.name,
                len(shard.running),
                f.max_batch,
                max(0, f.kv_pages - used),
                f.kv_pages,
                f.page_size,
                adapters_resident=shard.resident_set,
                ordinal=shard.ordinal,
            ),
            notify,
        )

    # -- measurement ------------------------------------------------------------------------------
    def _account(self, shard: _Shard, now: float) -> None:
        """Adds the time since the shard's last change to its batch state's total."""
        span = now - shard.state_since
        batch = len(shard.running)
        state = "idle" if batch == 0 else "full" if batch >= self.fleet.max_batch else "partial"
        self.state_s[state] += span
        self.batch_s += batch * span
        shard.state_since = now

    def _sample(self, now: float) -> None:
        f = self.fleet
        self.sample_times.append(now)
        self.samples.append([len(s.running) for s in self.shards])

        def released(shard: _Shard) -> bool:
            return shard.idle_since is not None and now - shard.idle_since >= f.release_after_s

        self.releasable.append(sum(released(s) for s in self.shards))
        top = 0
        for shard in reversed(self.shards):
            if not released(shard):
                break
            top += 1
        self.releasable_top.append(top)
        if now + f.sample_every_s <= f.duration_s:
            self._push(now + f.sample_every_s, 2, None)

    def _report(self) -> dict[str, object]:
        f = self.fleet
        gpu_s = sum(self.state_s.values())
        waits = sorted(self.queue_waits) or [0.0]
        busy_s = self.state_s["full"] + self.state_s["partial"]
        return {
            "policy": self.policy.value,
            "arrivals": self.arrivals,
            "completed": self.completed,
            "gpu_time_share": {k: round(v / gpu_s, 4) for k, v in self.state_s.items()},
            "mean_batch_when_busy": round(self.batch_s / busy_s, 2) if busy_s else 0.0,
            "migrations": self.migrations,
            "max_router_queue": self.max_queue,
            "rejected_queue_full": self.rejected,
            "queue_wait_p50_s": round(waits[len(waits) // 2], 4),
            "queue_wait_p99_s": round(waits[int(0.99 * (len(waits) - 1))], 4),
            "releasable_shards": {
                "mean": round(sum(self.releasable) / len(self.releasable), 2),
                "max": max(self.releasable),
            },
            "releasable_by_scale_in": {
                "mean": round(sum(self.releasable_top) / len(self.releasable_top), 2),
                "max": max(self.releasable_top),
            },
            "release_after_s": f.release_after_s,
        }


def _pick(cum_weights: list[float], u: float) -> int:
    return min(bisect.bisect_left(cum_weights, u), len(cum_weights) - 1)
