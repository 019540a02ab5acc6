"""A router in front of real shard processes (the tiny model on CPU) on loopback.

Proves, with real shards and the transformers + PEFT reference as the oracle: placement follows
the policy (read from the shards' own WatchLoad snapshots), a tiny KV pool forces migrations that
lose and repeat nothing, and a SIGKILLed shard's streams finish on the others exactly.

Shards listen on distinct loopback hosts so that their addresses, which break placement ties,
sort in a known order. All shards start once per module, in parallel.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from protos import generate_pb2, shard_pb2, shard_pb2_grpc
from tests.fleet import Completion, Router, Shard, collect
from tests.reference import greedy

pytestmark = pytest.mark.slow

# Four prompt tokens per request; the tiny model's context is 256 tokens.
PROMPT_LEN = 4


@dataclass
class Cluster:
    # --kv-pages 8 (32 tokens at page size 4): two requests of 28 tokens cannot share it.
    tight: Shard
    # The shard the kill test SIGKILLs; nothing else uses it.
    victim: Shard
    # --max-batch-size 4 each.
    roomy: list[Shard]


@pytest.fixture(scope="module")
def cluster(launch, tiny) -> Cluster:
    tight = launch(Shard, tiny, "127.0.0.2", "--kv-pages", "8")
    victim = launch(Shard, tiny, "127.0.0.3")
    roomy = [launch(Shard, tiny, f"127.0.0.{i}", "--max-batch-size", "4") for i in (4, 5, 6)]
    for shard in (tight, victim, *roomy):
        shard.wait_serving()
    return Cluster(tight, victim, roomy)


@dataclass(frozen=True)
class Job:
    adapter: str
    prompt: list[int]
    new_tokens: int

    def request(self, request_id: str) -> generate_pb2.GenerateRequest:
        return generate_pb2.GenerateRequest(
            request_id=request_id,
            adapter_id=self.adapter,
            prompt_token_ids=generate_pb2.TokenIds(ids=self.prompt),
            stopping=generate_pb2.StoppingCriteria(max_new_tokens=self.new_tokens, ignore_eos=True),
        )


def jobs(tiny, count: int, new_tokens: int) -> list[Job]:
    """`count` greedy requests over every adapter and the base model, distinct prompts."""
    adapters = [*tiny.adapter_ids, ""]
    return [
        Job(adapters[i % len(adapters)], [11 + i, 23 + 2 * i, 37, 5 + 3 * i], new_tokens)
        for i in range(count)
    ]


def assert_matches_reference(tiny, job: Job, done: Completion) -> None:
    """The same greedy tokens as PEFT running the request alone: nothing lost, nothing repeated."""
    adapter_dir = tiny.adapter_dir(job.adapter) if job.adapter else None
    want, _ = greedy(tiny.model_dir, adapter_dir, job.prompt, job.new_tokens)
    assert done.token_ids == want, job
    assert done.finish.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert done.finish.usage.generated_tokens == job.new_tokens
    assert done.finish.usage.prompt_tokens == PROMPT_LEN


def run_all(router: Router, batch: list[Job], prefix: str) -> list[Completion]:
    with ThreadPoolExecutor(len(batch)) as pool:
        return list(
            pool.map(
                lambda ij: collect(router.stub.Generate(ij[1].request(f"{prefix}-{ij[0]}"), 60)),
                enumerate(batch),
            )
        )


def preload(shard: Shard, adapters: tuple[str, ...]) -> None:
    """Makes adapters resident, so residency does not break placement ties against `shard`."""
    with grpc.insecure_channel(shard.address) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        for adapter in adapters:
            stub.LoadAdapter(shard_pb2.LoadAdapterRequest(adapter_id=adapter), timeout=30)


def counter(metrics: str, name: str) -> float:
    """The value of one Prometheus sample, 0 when absent."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


class PeakRunning:
    """Follows shards' WatchLoad streams in threads; records the largest running batch of each."""

    def __init__(self, shards: list[Shard]):
        self.peaks = {s.address: 0 for s in shards}
        self._channels = [grpc.insecure_channel(s.address) for s in shards]
        self._calls = [
            shard_pb2_grpc.ShardStub(ch).WatchLoad(shard_pb2.WatchLoadRequest())
            for ch in self._channels
        ]
        self._threads = [
            threading.Thread(target=self._follow, args=(s.address, call), daemon=True)
            for s, call in zip(shards, self._calls, strict=True)
        ]
        for thread in self._threads:
            thread.start()

    def _follow(self, address: str, call) -> None:
        try:
            for message in call:
                self.peaks[address] = max(self.peaks[address], message.snapshot.running)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.CANCELLED, err

    def close(self) -> None:
        for call in self._calls:
            call.cancel()
        for thread in self._threads:
            thread.join(5)
        for channel in self._channels:
            channel.close()


@pytest.mark.parametrize(
    ("policy", "expected"),
    # Six requests, batch 4: consolidation fills one shard and leaves one idle; least-loaded
    # spreads them evenly.
    [("consolidate", [4, 2, 0]), ("least-loaded", [2, 2, 2])],
)
def test_placement_follows_the_policy(
    launch: Callable, cluster: Cluster, tiny, policy: str, expected: list[int]
) -> None:
    router = launch(Router, f"--policy={policy}", *(f"--shard={s.address}" for s in cluster.roomy))
    router.wait_shards([s.address for s in cluster.roomy])
    batch = jobs(tiny, 6, 48)
    watch = PeakRunning(cluster.roomy)
    try:
        results = run_all(router, batch, f"placement-{policy}")
    finally:
        watch.close()
    router.stop()
    assert sorted(watch.peaks.values(), reverse=True) == expected
    for job, done in zip(batch, results, strict=True):
        assert len(done.token_ids) == done.finish.usage.generated_tokens == job.new_tokens
        assert done.finish.usage.migrations == 0


def test_tiny_kv_pool_forces_lossless_migrations(launch: Callable, cluster: Cluster, tiny) -> None:
    roomy = cluster.roomy[0]
    # The tight shard sorts first and holds every adapter: consolidation sends all four there.
    preload(cluster.tight, tiny.adapter_ids)
    router = launch(Router, f"--shard={cluster.tight.address}", f"--shard={roomy.address}")
    router.wait_shards([cluster.tight.address, roomy.address])
    batch = jobs(tiny, 4, 24)  # 28 tokens = 7 pages each, 8 pages on the tight shard
    results = run_all(router, batch, "tight")
    metrics = router.metrics()
    router.stop()
    for job, done in zip(batch, results, strict=True):
        assert_matches_reference(tiny, job, done)
    migrations = [done.finish.usage.migrations for done in results]
    assert sum(migrations) >= 1, migrations
    assert counter(metrics, 'lorafleet_router_migrations_total{reason="kv_exhausted"}') == sum(
        migrations
    )
    # The pool was sized for exactly one of these requests: it ran to the end on the tight shard.
    assert 0 in migrations, migrations


def test_sigkilled_shard_streams_finish_elsewhere_exactly(
    launch: Callable, cluster: Cluster, tiny
) -> None:
    survivors = cluster.roomy[:2]
    preload(cluster.victim, tiny.adapter_ids)
    router = launch(Router, *(f"--shard={s.address}" for s in (cluster.victim, *survivors)))
    router.wait_shards([s.address for s in (cluster.victim, *survivors)])
    batch = jobs(tiny, 4, 160)
    undisturbed = run_all(router, batch, "calm")
    assert all(done.finish.usage.migrations == 0 for done in undisturbed)
    streams = [router.stub.Generate(job.request(f"kill-{i}"), 60) for i, job in enumerate(batch)]
    firsts = [next(stream) for stream in streams]
    # Consolidation put all four on the victim (first address, adapters resident): kill it with
    # every stream mid-way.
    assert cluster.victim.snapshot().running == len(batch)
    cluster.victim.stop(signal.SIGKILL)
    for first, stream, calm in zip(firsts, streams, undisturbed, strict=True):
        rest = collect(stream)
        assert [*first.token_ids, *rest.token_ids] == calm.token_ids
        assert first.text + rest.text == calm.text
        assert rest.finish.usage.generated_tokens == calm.finish.usage.generated_tokens
        assert rest.finish.usage.migrations == 1
    metrics = router.metrics()
    router.stop()
    assert counter(metrics, 'lorafleet_router_migrations_total{reason="shard_failed"}') == 4
    # The survivors served the rest: their batches emptied again.
    for shard in survivors:
        assert shard.snapshot().running == 0


def test_sigstopped_shard_streams_finish_elsewhere_exactly(
    launch: Callable, cluster: Cluster, tiny
) -> None:
    """A frozen shard (a vanished host: no reset, no answer) is found by the router's keepalive
    pings; its streams resume elsewhere with every token exactly once (the fake-shard test
    proves the router's side; this one the real shards' resume)."""
    shards = cluster.roomy
    router = launch(
        Router,
        "--shard-keepalive-s=0.2",
        "--shard-keepalive-timeout-s=1",
        *(f"--shard={s.address}" for s in shards),
    )
    router.wait_shards([s.address for s in shards])
    batch = jobs(tiny, 4, 48)
    streams = [router.stub.Generate(job.request(f"stop-{i}"), 60) for i, job in enumerate(batch)]
    firsts = [next(stream) for stream in streams]
    (frozen,) = [s for s in shards if s.snapshot().running == len(batch)]  # consolidation
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        for job, first, stream in zip(batch, firsts, streams, strict=True):
            rest = collect(stream)
            done = Completion(
                [*first.token_ids, *rest.token_ids], first.text + rest.text, rest.finish
            )
            assert_matches_reference(tiny, job, done)
            assert rest.finish.usage.migrations == 1
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    router.stop()
