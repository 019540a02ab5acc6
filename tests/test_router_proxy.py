"""The router as a real process in front of fake shards: proxying, errors, deadlines,
cancellation, fan-out calls, reflection, metrics, the client CLI and a clean SIGTERM."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generate_pb2, generate_pb2_grpc
from tests.fake_shard import expected_tokens, token_text
from tests.fleet import (
    REPO,
    Router,
    assert_exact,
    child_env,
    generate,
    wait_until,
)


def test_concurrent_streams_for_many_adapters(fleet):
    jobs = [
        (adapter, f"prompt {i} for {adapter or 'base'}") for i in range(3) for adapter in "abc "
    ]
    jobs = [(adapter.strip(), prompt) for adapter, prompt in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: generate(fleet.router.stub, job[1], job[0], 20), jobs))
    for (adapter, prompt), done in zip(jobs, results, strict=True):
        assert_exact(done, adapter, prompt, 20)


@pytest.mark.parametrize(
    ("adapter", "prompt", "code", "details"),
    [
        ("nope", "hello", grpc.StatusCode.NOT_FOUND, "adapter 'nope' not under the root"),
        ("a", "error:INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT, "scripted"),
        ("a", "error:FAILED_PRECONDITION", grpc.StatusCode.FAILED_PRECONDITION, "scripted"),
    ],
)
def test_shard_errors_pass_through(fleet, adapter, prompt, code, details):
    with pytest.raises(grpc.RpcError) as raised:
        generate(fleet.router.stub, prompt, adapter)
    assert raised.value.code() == code
    assert details in raised.value.details()


def test_deadline_reaches_the_shard(fleet):
    generate(fleet.router.stub, "with a deadline", request_id="deadline-1", timeout=3.0)
    (start,) = [e for f in fleet.fakes for e in f.events("start", "deadline-1")]
    assert 2.0 < start["deadline_s"] < 3.1  # grpc rounds deadlines up slightly


def test_deadline_expiry_ends_the_shard_call(fleet):
    # 500 tokens take 5 s; 1.5 s leaves a loaded machine time to reach the shard first.
    with pytest.raises(grpc.RpcError) as raised:
        generate(fleet.router.stub, "too slow", tokens=500, request_id="deadline-2", timeout=1.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [e for f in fleet.fakes for e in f.events("start", "deadline-2")]
    wait_until(
        lambda: [e for f in fleet.fakes for e in f.events("cancelled", "deadline-2")],
        "the shard to see its call end",
    )


def test_client_cancel_reaches_the_shard_and_frees_its_pages(fleet):
    request = generate_pb2.GenerateRequest(
        request_id="cancel-1",
        adapter_id="c",
        prompt="cancel me",
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=1000),
    )
    stream = fleet.router.stub.Generate(request, timeout=30)
    next(stream), next(stream)
    (fake,) = [f for f in fleet.fakes if f.events("start", "cancel-1")]
    assert fake.snapshot().running >= 1
    stream.cancel()
    wait_until(lambda: fake.events("cancelled", "cancel-1"), "the shard to see the cancel", 3)
    wait_until(lambda: fake.snapshot().running == 0, "the shard's batch to empty", 3)
    assert fake.snapshot().kv_pages_free == fake.snapshot().kv_pages_total


def test_list_adapters_aggregates_every_shard(fleet):
    reply = fleet.router.stub.ListAdapters(generate_pb2.ListAdaptersRequest(), timeout=5)
    entries = sorted((a.shard, a.adapter_id) for a in reply.adapters)
    shards = sorted(f.address for f in fleet.fakes)
    assert entries == [(shard, adapter) for shard in shards for adapter in "abc"]


def test_get_info_describes_model_and_shards(fleet):
    info = fleet.router.stub.GetInfo(generate_pb2.GetInfoRequest(), timeout=5)
    assert info.model == "fake-llama"
    assert info.max_context == 4096
    assert sorted(info.shards) == sorted(f.address for f in fleet.fakes)


def test_health_serving(fleet):
    health = health_pb2_grpc.HealthStub(fleet.router.channel)
    for service in ("", "lorafleet.v1.Generator"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services_and_grpcurl_streams(fleet):
    target = fleet.router.address
    listed = subprocess.run(
        ["grpcurl", "-plaintext", target, "list"], capture_output=True, text=True, timeout=20
    )
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "lorafleet.v1.Generator",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    body = json.dumps({"adapter_id": "a", "prompt": "grpcurl", "stopping": {"max_new_tokens": 3}})
    streamed = subprocess.run(
        ["grpcurl", "-plaintext", "-d", body, target, "lorafleet.v1.Generator/Generate"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert streamed.returncode == 0, streamed.stderr
    assert "FINISH_REASON_LENGTH" in streamed.stdout
    assert token_text(expected_tokens("a", "grpcurl", 3)[2]).strip() in streamed.stdout


def test_metrics_are_exported(fleet):
    generate(fleet.router.stub, "for the metrics")
    generate(fleet.router.stub, "and a migration migrate@2")
    with contextlib.suppress(grpc.RpcError):
        generate(fleet.router.stub, "x", adapter="made-up-adapter")
    text = fleet.router.metrics()
    for name in (
        'lorafleet_router_requests_total{adapter="a",status="OK"}',
        'lorafleet_router_requests_total{adapter="<unknown>",status="NOT_FOUND"}',
        "lorafleet_router_queue_time_seconds_count",
        "lorafleet_router_time_to_first_token_seconds_count",
        "lorafleet_router_inter_token_latency_seconds_count",
        'lorafleet_router_migrations_total{reason="kv_exhausted"}',
        "lorafleet_router_queue_depth",
        "lorafleet_router_shards 2.0",
        f'lorafleet_router_shard_running{{shard="{fleet.fakes[0].address}"}}',
        f'lorafleet_router_shard_kv_pages_used{{shard="{fleet.fakes[1].address}"}}',
    ):
        assert name in text, name
    assert "made-up-adapter" not in text


def test_client_cli_streams_and_lists(fleet):
    def lorafleet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "router.client", *args],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )

    target = f"--target={fleet.router.address}"
    done = lorafleet("generate", target, "--adapter=b", "--max-new-tokens=5", "cli prompt")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        == "".join(map(token_text, expected_tokens("b", "cli prompt", 5))).strip()
    )
    assert "length: 2 prompt + 5 generated tokens" in done.stderr
    listed = lorafleet("adapters", target)
    assert listed.returncode == 0, listed.stderr
    assert all(f.address in listed.stdout for f in fleet.fakes)
    missing = lorafleet("generate", target, "--adapter=nope", "x")
    assert missing.returncode == 1
    assert "NOT_FOUND: adapter 'nope' not under the root" in missing.stderr


def test_sigterm_lets_open_streams_finish(launch, fleet):
    router = launch(Router, "--shutdown-grace-s=10", *(f"--shard={f.address}" for f in fleet.fakes))
    router.wait_shards([f.address for f in fleet.fakes])
    stream = router.stub.Generate(
        generate_pb2.GenerateRequest(
            adapter_id="a",
            prompt="finish before exit",
            stopping=generate_pb2.StoppingCriteria(max_new_tokens=80),
        ),
        timeout=20,
    )
    ids = list(next(stream).token_ids)
    router.proc.send_signal(signal.SIGTERM)
    for message in stream:
        ids.extend(message.token_ids)
    assert ids == expected_tokens("a", "finish before exit", 80)
    assert router.proc.wait(10) == 0


def _connectivity(address: str) -> tuple[grpc.Channel, list[grpc.ChannelConnectivity]]:
    states: list[grpc.ChannelConnectivity] = []
    channel = grpc.insecure_channel(address)
    channel.subscribe(states.append, try_to_connect=True)
    return channel, states


def test_max_connection_age_moves_clients_without_cutting_streams(launch, fleet):
    aged = launch(
        Router,
        "--max-connection-age-s=0.5",
        "--max-connection-age-grace-s=30",
        *(f"--shard={f.address}" for f in fleet.fakes),
    )
    aged.wait_shards([f.address for f in fleet.fakes])
    ready, idle = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE
    for router, goes_away in ((aged, True), (fleet.router, False)):
        channel, states = _connectivity(router.address)
        with channel:
            stub = generate_pb2_grpc.GeneratorStub(channel)
            # 120 tokens of 10 ms: the stream outlives the connection's age, inside the grace.
            assert_exact(generate(stub, "outlive the age", "a", 120), "a", "outlive the age", 120)
            connected = states.index(ready)
            # GOAWAY turns the channel IDLE; the default age (minutes) keeps it READY.
            assert (idle in states[connected:]) == goes_away, states
            assert_exact(generate(stub, "next call", "b", 3), "b", "next call", 3)
            assert states[-1] == ready
    aged.stop()
