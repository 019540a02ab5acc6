"""The OpenAI-compatible HTTP API of a real router + shard, driven by the official `openai` client:
tokens equal the gRPC path's and transformers + PEFT greedy output."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from protos import generate_pb2, generate_pb2_grpc
from router.local_process import free_port
from router.openai_api.errors import from_status
from tests.fleet import Router, wait_until
from tests.processes import REPO, shard_args, start, stop, wait_serving
from tests.reference import greedy

pytestmark = pytest.mark.slow
NEW = 10
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def api(tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = Path(tmp_path_factory.mktemp("logs"))
    shard_port, router_port, http_port = free_port(), free_port(), free_port()
    shard = start(shard_args(tiny, shard_port), logs / "shard.log")
    router = None
    try:
        wait_serving(f"127.0.0.1:{shard_port}", shard, logs / "shard.log")
        router = start(
            [
                *("router", "--host", "127.0.0.1", "--port", str(router_port)),
                *("--http-port", str(http_port), "--shard", f"127.0.0.1:{shard_port}"),
            ],
            logs / "router.log",
        )
        wait_serving(f"127.0.0.1:{router_port}", router, logs / "router.log")
        base_url = f"http://127.0.0.1:{http_port}/v1"
        deadline = time.monotonic() + 30
        while True:  # the router lists the shard once its load stream is live
            try:
                if httpx.get(f"{base_url}/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (logs / "router.log").read_text()[-3000:]
            time.sleep(0.1)
        yield {
            "base_url": base_url,
            "router": f"127.0.0.1:{router_port}",
            "shard": f"127.0.0.1:{shard_port}",
        }
    finally:
        if router is not None:
            stop(router)
        stop(shard)


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api["base_url"], api_key="unused", max_retries=0, timeout=120)


def _chat_prompt(tiny) -> list[int]:
    return list(
        AutoTokenizer.from_pretrained(tiny.model_dir).apply_chat_template(
            CONVERSATION, add_generation_prompt=True, return_dict=False
        )
    )


def _grpc_chat(api, adapter: str) -> tuple[list[int], str]:
    request = generate_pb2.GenerateRequest(
        adapter_id=adapter,
        messages=generate_pb2.ChatMessages(
            messages=[generate_pb2.ChatMessage(**m) for m in CONVERSATION]
        ),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=NEW, ignore_eos=True),
    )
    with grpc.insecure_channel(api["router"]) as channel:
        msgs = list(generate_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=60))
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)


def test_lists_base_model_and_adapters_with_parent(client, tiny) -> None:
    models = {m.id: m.model_dump() for m in client.models.list()}
    base = tiny.model_dir.name
    assert set(models) == {base, *tiny.adapter_ids}
    assert models[base]["parent"] is None
    assert all(models[a]["parent"] == base for a in tiny.adapter_ids)
    assert all(m["object"] == "model" for m in models.values())


def test_streams_chat_for_adapters_and_base_concurrently(api, client, tiny) -> None:
    tok = Tokenizer.from_file(str(tiny.model_dir / "tokenizer.json"))
    prompt = _chat_prompt(tiny)
    base = tiny.model_dir.name
    models = [*tiny.adapter_ids[:3], base]
    results: dict[str, tuple[str, list[str], list]] = {}

    def run(model: str) -> None:
        stream = client.chat.completions.create(
            model=model,
            messages=CONVERSATION,
            stream=True,
            temperature=0,
            max_tokens=NEW,
            logprobs=True,
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        tokens = [
            (t.token, t.logprob)
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.content
        ]
        results[model] = (text, tokens, chunks)

    threads = [threading.Thread(target=run, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for model in models:
        adapter = "" if model == base else model
        want, logits = greedy(
            tiny.model_dir, tiny.adapter_dir(adapter) if adapter else None, prompt, NEW
        )
        grpc_ids, grpc_text = _grpc_chat(api, adapter)
        text, tokens, chunks = results[model]
        assert grpc_ids == want, model
        assert text == grpc_text == tok.decode(want), model
        assert [t for t, _ in tokens] == [tok.decode([t], skip_special_tokens=False) for t in want]
        want_lp = torch.log_softmax(logits, dim=-1)[torch.arange(NEW), torch.tensor(want)]
        assert torch.allclose(torch.tensor([lp for _, lp in tokens]), want_lp, atol=1e-3), model
        first, last = chunks[0], chunks[-1]
        assert (
            first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
        )
        assert last.choices[0].finish_reason == "length"
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
        assert len({c.id for c in chunks}) == 1 and first.model == model


def test_non_streaming_completion_and_chat(client, tiny) -> None:
    tok = Tokenizer.from_file(str(tiny.model_dir / "tokenizer.json"))
    adapter = tiny.adapter_ids[2]
    prompt = "The café was open"
    done = client.completions.create(
        model=adapter, prompt=prompt, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True}
    )
    want, _ = greedy(tiny.model_dir, tiny.adapter_dir(adapter), tok.encode(prompt).ids, NEW)
    assert done.object == "text_completion"
    assert done.choices[0].text == tok.decode(want)
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == NEW
    assert done.usage.prompt_tokens == len(tok.encode(prompt).ids)
    chat = client.chat.completions.create(
        model=adapter, messages=CONVERSATION, max_completion_tokens=NEW, temperature=0, seed=3
    )
    want, _ = greedy(tiny.model_dir, tiny.adapter_dir(adapter), _chat_prompt(tiny), NEW)
    stop_at = next((i for i, t in enumerate(want) if t == tok.token_to_id("</s>")), None)
    expected = want if stop_at is None else want[:stop_at]
    assert chat.choices[0].message.content == tok.decode(expected)
    assert chat.choices[0].finish_reason == ("length" if stop_at is None else "stop")
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_usage_chunk_when_asked(client, tiny) -> None:
    stream = client.completions.create(
        model=tiny.adapter_ids[0],
        prompt=[5, 6, 7],
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    logprobs = [c.choices[0].logprobs for c in chunks if c.choices]
    assert sum(len(lp.token_logprobs) for lp in logprobs) == 4
    assert all(x <= 0 for lp in logprobs for x in lp.token_logprobs)
    assert all(len(lp.tokens) == len(lp.text_offset) for lp in logprobs)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_cached_prompt_tokens_through_router_and_openai_api(api, client, tiny) -> None:
    """The shard's prefix cache (4-token pages) reaches the client: a first request with a
    fresh prompt finds nothing cached, the same prompt again finds its full blocks (all but the
    block holding the last token), a prompt sharing only two blocks finds those two; gRPC says
    it in usage.cached_prompt_tokens, the OpenAI API in usage.prompt_tokens_details, and the
    tokens of every hit equal PEFT's."""
    adapter = tiny.adapter_ids[1]
    prompt = [(29 * i + 11) % 280 + 9 for i in range(18)]  # no other test sends it
    request = generate_pb2.GenerateRequest(
        adapter_id=adapter,
        prompt_token_ids=generate_pb2.TokenIds(ids=prompt),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=4, ignore_eos=True),
    )
    with grpc.insecure_channel(api["router"]) as channel:
        first = list(generate_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=60))
    assert first[-1].usage.prompt_tokens == 18 and first[-1].usage.cached_prompt_tokens == 0
    want, _ = greedy(tiny.model_dir, tiny.adapter_dir(adapter), prompt, 4)
    again = client.completions.create(
        model=adapter, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert again.usage.prompt_tokens_details.cached_tokens == 16
    tok = Tokenizer.from_file(str(tiny.model_dir / "tokenizer.json"))
    assert again.choices[0].text == tok.decode(want)
    partial = [*prompt[:9], 3, 4, 5]
    stream = client.completions.create(
        model=adapter,
        prompt=partial,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 8
    want, _ = greedy(tiny.model_dir, tiny.adapter_dir(adapter), partial, 4)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tok.decode(want)
    conversation = [
        {"role": "system", "content": "You count sheep, one by one, in a quiet voice."},
        {"role": "user", "content": "Begin."},
    ]
    chats = [
        client.chat.completions.create(
            model=adapter, messages=conversation, max_completion_tokens=2, temperature=0
        )
        for _ in range(2)
    ]
    # The first may share the template's opening blocks with earlier chats of this module.
    whole = (chats[0].usage.prompt_tokens - 1) // 4 * 4
    cached = [c.usage.prompt_tokens_details.cached_tokens for c in chats]
    assert cached[0] < whole == cached[1]


def test_unknown_model_and_bad_parameters(client) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-adapter", messages=CONVERSATION)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="hi", stream=True)
    for params, param in (
        ({"n": 2}, "n"),
        ({"top_logprobs": 3, "logprobs": True}, "top_logprobs"),
        ({"temperature": 3}, "temperature"),
        ({"presence_penalty": 1}, "presence_penalty"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="r4-qv", messages=CONVERSATION, **params)
        assert err.value.body["param"] == param, err.value.body
    with pytest.raises(openai.BadRequestError, match="roles must be"):
        client.chat.completions.create(model="r4-qv", messages=[{"role": "robot", "content": "x"}])


def test_client_disconnect_cancels_the_request(fleet) -> None:
    """Two fake shards (10 ms per token) behind a router: hanging up mid-stream cancels the
    shard's request, as a gRPC cancel does."""
    url = f"http://127.0.0.1:{fleet.router.http_port}/v1/completions"
    body = {"model": "a", "prompt": "cancel me", "max_tokens": 100000, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        line = next(reply.iter_lines())
        assert json.loads(line.removeprefix("data: "))["object"] == "text_completion"
    wait_until(
        lambda: [e for f in fleet.fakes for e in f.events("cancelled")],
        "the shard to see the cancel",
        5,
    )
    assert 'status="CANCELLED"' in fleet.router.metrics()


def test_non_streaming_request_is_cancelled_when_the_client_leaves(fleet) -> None:
    url = f"http://127.0.0.1:{fleet.router.http_port}/v1/chat/completions"
    before = len([e for f in fleet.fakes for e in f.events("cancelled")])
    body = {"model": "b", "messages": CONVERSATION, "max_tokens": 100000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=httpx.Timeout(10, read=1.0))
    wait_until(
        lambda: len([e for f in fleet.fakes for e in f.events("cancelled")]) > before,
        "the shard to see the cancel",
        5,
    )


def test_full_fleet_and_full_queue_is_429(fleet, launch) -> None:
    """Both fake shards (batch 8) full and a router queue of 0: the next request gets 429."""
    router = launch(Router, *(f"--shard={f.address}" for f in fleet.fakes), "--queue-size=0")
    router.wait_shards([f.address for f in fleet.fakes])
    url = f"http://127.0.0.1:{router.http_port}/v1/completions"
    body = {"model": "c", "prompt": "hold", "max_tokens": 100000, "stream": True}
    with httpx.Client(timeout=30) as http, contextlib.ExitStack() as streams:
        for _ in range(16):
            reply = streams.enter_context(http.stream("POST", url, json=body))
            assert reply.status_code == 200
        refused = http.post(url, json={**body, "stream": False})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "queue is full" in refused.json()["error"]["message"]


def test_no_shard_is_503_and_errors_map_to_http(launch) -> None:
    router = launch(Router, f"--shard=127.0.0.1:{free_port()}", "--queue-timeout-s=0.5")
    url = f"http://127.0.0.1:{router.http_port}/v1"
    models = httpx.get(f"{url}/models", timeout=10)
    assert models.status_code == 503 and "no shard is serving" in models.json()["error"]["message"]
    chat = httpx.post(
        f"{url}/chat/completions", json={"model": "m", "messages": CONVERSATION}, timeout=10
    )
    assert chat.status_code == 503 and chat.headers["retry-after"] == "1"
    missing = httpx.post(f"{url}/chat/completions", json={"model": "m"}, timeout=10)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    assert httpx.get(f"{url}/nowhere", timeout=10).json()["error"]["message"] == "Not Found"
    for code, status in (
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.INTERNAL, 500),
    ):
        assert from_status(code, "why", "m").status == status


def test_readme_curl_examples_work(api) -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^(curl -N .*?)(?:\n(?!  )|\Z)", readme.replace("\\\n", ""), re.M | re.S)
    assert len(commands) >= 3, "README lost its curl -N examples"
    port = api["base_url"].split(":")[2].split("/")[0]
    for command in commands:
        args = shlex.split(command.replace("localhost:8000", f"127.0.0.1:{port}"))
        out = subprocess.run(
            [*args, "-sS", "--fail-with-body"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, (command, out.stdout, out.stderr)
        if '"stream": true' in command:
            assert out.stdout.rstrip().endswith("data: [DONE]"), out.stdout
        else:
            assert json.loads(out.stdout)["object"] in (
                "list",
                "chat.completion",
                "text_completion",
            )
