"""Lossless migration through a real router process: every token exactly once when a shard
evicts, drains, fails or dies mid-stream."""

from __future__ import annotations

import signal

import pytest

from protos import generate_pb2
from tests.fake_shard import expected_tokens
from tests.fleet import (
    Fake,
    Router,
    assert_exact,
    generate,
)


@pytest.mark.parametrize(
    ("prompt", "resumed_at"),
    [
        ("plain prompt", None),
        ("kv runs out migrate@3", 3),
        ("kv runs out before the first token migrate@0", 0),
        ("the shard drains drain@5", 5),
        ("the shard goes UNAVAILABLE abort@4", 4),
        ("one token left migrate@11", 11),
    ],
)
def test_stream_continues_across_migration_exactly(fleet, prompt, resumed_at):
    request_id = f"exact-{abs(hash(prompt))}"
    done = generate(fleet.router.stub, prompt, "b", 12, request_id)
    assert_exact(done, "b", prompt, 12)
    assert done.finish.usage.migrations == (0 if resumed_at is None else 1)
    assert done.finish.usage.time_to_first_token_s > 0
    starts = [e for f in fleet.fakes for e in f.events("start", request_id)]
    assert sorted(e["resumed"] for e in starts) == [0] + (
        [] if resumed_at is None else [resumed_at]
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_lost_shard_streams_finish_elsewhere(launch, sig):
    """A killed shard resets its connections; a frozen one (a vanished host) answers nothing, and
    only the router's keepalive pings find it dead."""
    fakes = [launch(Fake, "127.0.0.1", 0, "--token-delay-s=0.05") for _ in range(2)]
    router = launch(
        Router,
        "--shard-keepalive-s=0.2",
        "--shard-keepalive-timeout-s=1",
        *(f"--shard={f.address}" for f in fakes),
    )
    router.wait_shards([f.address for f in fakes])
    prompts = [f"survive the crash {i}" for i in range(4)]
    streams = [
        router.stub.Generate(
            generate_pb2.GenerateRequest(
                request_id=f"crash-{sig}-{i}",
                adapter_id="a",
                prompt=prompt,
                stopping=generate_pb2.StoppingCriteria(max_new_tokens=30),
            ),
            timeout=20,
        )
        for i, prompt in enumerate(prompts)
    ]
    received = [list(next(stream).token_ids) for stream in streams]
    # Consolidation put all four on one shard: take it away mid-stream.
    (victim,) = [f for f in fakes if f.events("start", f"crash-{sig}-0")]
    assert all(victim.events("start", f"crash-{sig}-{i}") for i in range(4))
    victim.proc.send_signal(sig)
    try:
        for stream, ids in zip(streams, received, strict=True):
            final = None
            for message in stream:
                ids.extend(message.token_ids)
                final = message
            assert final is not None
            assert final.usage.migrations == 1
            assert final.usage.generated_tokens == 30
    finally:
        victim.proc.send_signal(signal.SIGCONT)
    assert received == [expected_tokens("a", p, 30) for p in prompts]
    (survivor,) = [f for f in fakes if f is not victim]
    assert all(survivor.events("start", f"crash-{sig}-{i}")[0]["resumed"] > 0 for i in range(4))
    router.stop()
    victim.stop()
