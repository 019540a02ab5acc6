"""Placement through a real router process: the policy on a burst, draining, the bounded queue."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from protos import generate_pb2, shard_pb2, shard_pb2_grpc
from tests.fake_shard import expected_tokens
from tests.fleet import (
    Fake,
    Router,
    assert_exact,
    generate,
    wait_until,
)


def _placements(fakes: list[Fake], prefix: str) -> list[int]:
    counts = [
        sum(e["request_id"].startswith(prefix) and e["resumed"] == 0 for e in f.events("start"))
        for f in fakes
    ]
    return sorted(counts, reverse=True)


@pytest.fixture(scope="module")
def trio(launch) -> list[Fake]:
    """Three idle fake shards with a batch of 4."""
    with ThreadPoolExecutor() as pool:
        return list(
            pool.map(lambda _: launch(Fake, "127.0.0.1", 0, "--max-batch-size=4"), range(3))
        )


@pytest.mark.parametrize(
    ("policy", "expected"), [("consolidate", [4, 4, 2]), ("least-loaded", [4, 3, 3])]
)
def test_burst_placement_follows_the_policy(launch, trio, policy, expected):
    router = launch(Router, f"--policy={policy}", *(f"--shard={f.address}" for f in trio))
    router.wait_shards([f.address for f in trio])
    prefix = f"burst-{policy}-"
    with ThreadPoolExecutor(10) as pool:
        results = list(
            pool.map(
                lambda i: generate(router.stub, f"burst {i}", "a", 40, f"{prefix}{i}"), range(10)
            )
        )
    for i, done in enumerate(results):
        assert_exact(done, "a", f"burst {i}", 40)
    assert _placements(trio, prefix) == expected
    router.stop()


def test_drained_shard_gets_no_new_requests(launch, trio):
    router = launch(Router, *(f"--shard={f.address}" for f in trio))
    router.wait_shards([f.address for f in trio])
    # Consolidation sends a lone request to the smallest shard id; drain exactly that one.
    first = generate(router.stub, "who takes me", request_id="drain-probe")
    assert_exact(first, "a", "who takes me", 12)
    (drained,) = [f for f in trio if f.events("start", "drain-probe")]
    running = router.stub.Generate(
        generate_pb2.GenerateRequest(
            request_id="drain-running",
            adapter_id="a",
            prompt="running while draining",
            stopping=generate_pb2.StoppingCriteria(max_new_tokens=60),
        ),
        timeout=20,
    )
    ids = list(next(running).token_ids)
    with grpc.insecure_channel(drained.address) as channel:
        shard_pb2_grpc.ShardStub(channel).Drain(shard_pb2.DrainRequest(), timeout=5)
    router.wait_shards([f.address for f in trio if f is not drained])
    for message in running:
        ids.extend(message.token_ids)
    assert ids == expected_tokens("a", "running while draining", 60)
    for i in range(4):
        generate(router.stub, f"after drain {i}", request_id=f"after-drain-{i}")
        assert not drained.events("start", f"after-drain-{i}")
    router.stop()


def test_queue_bound_answers_resource_exhausted(launch):
    fake = launch(Fake, "127.0.0.1", 0, "--max-batch-size=1")
    router = launch(Router, f"--shard={fake.address}", "--queue-size=1")
    router.wait_shards([fake.address])
    hold = router.stub.Generate(
        generate_pb2.GenerateRequest(
            adapter_id="a",
            prompt="holds the only slot",
            stopping=generate_pb2.StoppingCriteria(max_new_tokens=1000),
        ),
        timeout=30,
    )
    next(hold)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(generate, router.stub, "waits its turn", "b", 5)
        wait_until(
            lambda: "lorafleet_router_queue_depth 1.0" in router.metrics(), "one queued request"
        )
        with pytest.raises(grpc.RpcError) as raised:
            generate(router.stub, "one too many", "c", 5)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--queue-size" in raised.value.details()
        assert "retry" in raised.value.details()
        assert ("grpc-retry-pushback-ms", "1000") in raised.value.trailing_metadata()
        assert not waiting.done()
        hold.cancel()
        assert_exact(waiting.result(timeout=10), "b", "waits its turn", 5)
