"""The router's guards against one request hurting the fleet: a request that fails every shard
stops after its second, ids are labels only, and a router without shards says so."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import grpc
import pytest

from protos import generate_pb2
from tests.fake_shard import expected_tokens
from tests.fleet import Fake, Router, assert_exact, fleet, generate, launch  # noqa: F401


def test_a_request_that_fails_two_shards_is_not_placed_on_a_third(launch: Callable) -> None:  # noqa: F811
    fakes = [launch(Fake) for _ in range(3)]
    router = launch(Router, "--max-migrations=5", *(f"--shard={f.address}" for f in fakes))
    router.wait_shards([f.address for f in fakes])
    with pytest.raises(grpc.RpcError) as err:
        generate(router.stub, "this is a poison request", request_id="pill", tokens=8)
    assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
    assert re.search(
        r"shards failed 2 times while serving .* does not place it again", err.value.details()
    )
    starts = [e for f in fakes for e in f.events("start", "pill")]
    assert len(starts) == 2, starts
    # The fleet still serves, the failed shards included once their next snapshot arrives.
    time.sleep(1.5)
    for i in range(3):
        done = generate(router.stub, f"after the pill {i}", request_id=f"after-{i}")
        assert_exact(done, "a", f"after the pill {i}", 12)


def test_one_shard_failure_still_migrates(fleet) -> None:  # noqa: F811
    done = generate(fleet.router.stub, "fails once abort@3", request_id="once", tokens=8)
    assert_exact(done, "a", "fails once abort@3", 8)
    assert done.finish.usage.migrations == 1


def test_duplicate_request_ids_among_live_calls_do_not_interfere(fleet) -> None:  # noqa: F811
    prompts = [f"twin stream {i}" for i in range(4)]
    streams = [
        fleet.router.stub.Generate(
            generate_pb2.GenerateRequest(
                request_id="twin",
                adapter_id="a",
                prompt=p,
                stopping=generate_pb2.StoppingCriteria(max_new_tokens=20),
            ),
            timeout=20,
        )
        for p in prompts
    ]
    firsts = [next(s) for s in streams]
    streams[0].cancel()
    for first, stream, prompt in zip(firsts[1:], streams[1:], prompts[1:], strict=True):
        ids = list(first.token_ids) + [t for m in stream for t in m.token_ids]
        assert ids == expected_tokens("a", prompt, 20)


def test_a_router_with_no_serving_shard_warns_promptly(launch: Callable) -> None:  # noqa: F811
    router = launch(Router, "--shard=127.0.0.1:9")  # nothing listens on the discard port
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in _log(router).splitlines() if line[:1] == "{"]
        warnings = [e for e in lines if e.get("level") == "warning" and "no shard" in e["event"]]
        if warnings:
            break
        time.sleep(0.2)
    assert warnings, router.output()[-2000:]
    assert "127.0.0.1:9" in json.dumps(warnings[0])


def _log(process) -> str:
    return process.stdout.read_text() + process.stderr.read_text()
