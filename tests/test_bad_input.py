"""Hostile requests: the bad-input matrix (every hostile or careless request, through the router
and straight to a shard, gets its exact status and a message a user can act on, and the fleet
serves the next normal request exactly as before: same greedy tokens) and property-based
fuzzing of GenerateRequest against the same live shard."""

from __future__ import annotations

import collections
import math
import os
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from tests.fleet import Router, Shard, launch, load_snapshot  # noqa: F401 - launch is a fixture

pytestmark = pytest.mark.slow
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OK = grpc.StatusCode.OK
KV_PAGES = 40  # x 4-token pages: this shard holds at most 160 tokens per request
NORMAL = generate_pb2.GenerateRequest(
    prompt_token_ids=generate_pb2.TokenIds(ids=[5, 17, 42]),
    stopping=generate_pb2.StoppingCriteria(max_new_tokens=6, ignore_eos=True),
)


def _req(**fields) -> generate_pb2.GenerateRequest:
    fields.setdefault("prompt", "hello")
    fields.setdefault("stopping", generate_pb2.StoppingCriteria(max_new_tokens=4))
    return generate_pb2.GenerateRequest(**fields)


def _sampling(**fields) -> generate_pb2.GenerateRequest:
    return _req(sampling=generate_pb2.SamplingParams(**fields))


def _stops(*stops: str) -> generate_pb2.GenerateRequest:
    return _req(stopping=generate_pb2.StoppingCriteria(max_new_tokens=4, stop=list(stops)))


def _ids(*ids: int, new: int = 4) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt_token_ids=generate_pb2.TokenIds(ids=list(ids)),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=new),
    )


def _bad_utf8(field: str) -> bytes:
    good = _req(**{field: "\x01\x02"}).SerializeToString()
    return good.replace(b"\x01\x02", b"\xff\xfe", 1)


# (case, request or raw bytes, status, regex the details must match)
CASES: list[tuple[str, generate_pb2.GenerateRequest | bytes, grpc.StatusCode, str]] = [
    ("unknown adapter", _req(adapter_id="no-such"), grpc.StatusCode.NOT_FOUND, "not found"),
    ("path escape", _req(adapter_id="../etc"), INVALID, "valid name"),
    ("slash in adapter", _req(adapter_id="a/b"), INVALID, "valid name"),
    ("10 KB adapter id", _req(adapter_id="x" * 10_000), INVALID, r"adapter.id.*(longer|valid)"),
    ("10 KB request id", _req(request_id="r" * 10_000), INVALID, "request_id .* longer than 256"),
    ("empty prompt", _req(prompt=""), INVALID, "prompt is empty"),
    ("no input", generate_pb2.GenerateRequest(), INVALID, "no input"),
    ("empty token ids", _ids(), INVALID, "prompt_token_ids is empty"),
    ("id = vocab", _ids(1, 480), INVALID, "vocabulary size 480"),
    ("id 2**32-1", _ids(2**32 - 1), INVALID, "vocabulary size"),
    ("prompt past context", _ids(*[5] * 300), INVALID, "(context|pool) .*shorten"),
    ("1.8 MB text prompt", _req(prompt="hello world " * 150_000), INVALID, "bytes.*shorten it"),
    ("prompt + max_new past pool", _ids(5, 6, new=200), INVALID, "at most 158"),
    ("temperature -1", _sampling(temperature=-1), INVALID, r"temperature must be in \[0, 100\]"),
    ("temperature 101", _sampling(temperature=101), INVALID, "temperature must be in"),
    ("temperature nan", _sampling(temperature=math.nan), INVALID, "temperature must be in"),
    ("temperature inf", _sampling(temperature=math.inf), INVALID, "temperature must be in"),
    ("top_p 1.5", _sampling(temperature=1, top_p=1.5), INVALID, r"top_p must be in \(0, 1\]"),
    ("top_p -0.5", _sampling(temperature=1, top_p=-0.5), INVALID, "top_p must be in"),
    ("top_p nan", _sampling(temperature=1, top_p=math.nan), INVALID, "top_p must be in"),
    ("top_k -1", _sampling(temperature=1, top_k=-1), INVALID, "top_k must be >= 0"),
    ("penalty -1", _sampling(repetition_penalty=-1), INVALID, "repetition_penalty must be in"),
    ("penalty 1e-40", _sampling(repetition_penalty=1e-40), INVALID, r"\[0.01, 10\]"),
    ("penalty 11", _sampling(repetition_penalty=11), INVALID, "repetition_penalty must be in"),
    ("penalty nan", _sampling(repetition_penalty=math.nan), INVALID, "repetition_penalty"),
    ("17 stop strings", _stops(*"abcdefghijklmnopq"), INVALID, "at most 16 stop strings"),
    ("empty stop string", _stops(""), INVALID, r"stop strings must be 1\.\.256 bytes"),
    ("300-byte stop string", _stops("s" * 300), INVALID, r"1\.\.256 bytes, got 'sss.*\.\.\."),
    ("bad UTF-8 prompt", _bad_utf8("prompt"), INVALID, "does not parse.*UTF-8"),
    ("bad UTF-8 adapter", _bad_utf8("adapter_id"), INVALID, "does not parse.*UTF-8"),
    ("bad UTF-8 request id", _bad_utf8("request_id"), INVALID, "does not parse.*UTF-8"),
    ("not protobuf", b"\xff\xff\xff\xff\xff", INVALID, "does not parse"),
    # Accepted edges: each must be served, not crash anything.
    ("poison pill", _sampling(temperature=1e-40, top_p=0.9), OK, ""),
    ("tiny temperature top_k", _sampling(temperature=1e-30, top_k=1, seed=3), OK, ""),
    ("temperature 100", _sampling(temperature=100, top_p=1e-9, seed=1), OK, ""),
    ("penalty 0.01", _sampling(temperature=0.5, repetition_penalty=0.01, seed=2), OK, ""),
    ("penalty 10", _sampling(repetition_penalty=10), OK, ""),
    ("top_k 2**31-1", _sampling(temperature=1, top_k=2**31 - 1, seed=4), OK, ""),
    ("seed 2**64-1", _sampling(temperature=1, seed=2**64 - 1), OK, ""),
    ("NUL and emoji prompt", _req(prompt="\x00\U0001f600\u202e"), OK, ""),
    ("stop = whole output", _stops("\x00", "a" * 256), OK, ""),
    ("request id reused", _req(request_id="same"), OK, ""),
    ("max tokens to the pool", _ids(5, 6, new=158), OK, ""),
]


def call(address: str, request: generate_pb2.GenerateRequest | bytes) -> list:
    with grpc.insecure_channel(address) as channel:
        if isinstance(request, bytes):
            generate = channel.unary_stream(
                "/lorafleet.v1.Generator/Generate",
                response_deserializer=generate_pb2.GenerateResponse.FromString,
            )
            return list(generate(request, timeout=60))
        return list(generate_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=60))


def tokens(messages: list) -> list[int]:
    return [t for m in messages for t in m.token_ids]


@pytest.fixture(scope="module")
def fleet(launch: Callable, tiny) -> dict:  # noqa: F811
    shard = launch(Shard, tiny, "127.0.0.1", "--kv-pages", str(KV_PAGES))
    shard.wait_serving()
    router = launch(Router, f"--shard={shard.address}")
    router.wait_shards([shard.address])
    baseline = tokens(call(shard.address, NORMAL))
    assert len(baseline) == 6
    return {
        "router": router.address,
        "shard": shard.address,
        "baseline": baseline,
        "pid": shard.proc.pid,
    }


@pytest.mark.parametrize("target", ["router", "shard"])
@pytest.mark.parametrize(("case", "request_", "code", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(fleet, target: str, case: str, request_, code, needle: str) -> None:
    address = fleet[target]
    if code is OK:
        messages = call(address, request_)
        assert messages[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
        assert all(0 <= t < 480 for t in tokens(messages))
    else:
        with pytest.raises(grpc.RpcError) as err:
            call(address, request_)
        details = err.value.details() or ""
        assert err.value.code() == code, f"{case}: {err.value.code()} {details[:300]}"
        assert re.search(needle, details), details[:300]
        assert len(details) < 600, f"{case}: {len(details)}-char details"
    assert tokens(call(address, NORMAL)) == fleet["baseline"]


@pytest.mark.parametrize(
    ("resume", "needle"),
    [
        (shard_pb2.ResumeState(generated_token_ids=[480]), "resume.generated_token_ids .* vocab"),
        (shard_pb2.ResumeState(generated_token_ids=[2**32 - 1]), "vocabulary size 480"),
        (shard_pb2.ResumeState(generated_token_ids=[5] * 4), "nothing is left to generate"),
    ],
)
def test_bad_resume_state_is_refused_at_the_shard_edge(fleet, resume, needle: str) -> None:
    with grpc.insecure_channel(fleet["shard"]) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        request = shard_pb2.ShardGenerateRequest(request=_req(), resume=resume)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=30))
    assert err.value.code() == INVALID, err.value.details()
    assert re.search(needle, err.value.details()), err.value.details()
    assert tokens(call(fleet["shard"], NORMAL)) == fleet["baseline"]


# Client errors a hostile request may get; anything else (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED
# from a hang, UNAVAILABLE from a crash) fails the property.
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
EXAMPLES = 30

any_float = st.floats(width=32) | st.sampled_from([0.0, -1.0, 1e-40, math.nan, math.inf])
any_text = st.text(max_size=40) | st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
any_ids = st.lists(st.integers(0, 479) | st.integers(0, 2**32 - 1), max_size=300)
# Fields a request may get hostile values in; the others stay valid, so most requests reach
# generation with one or two odd fields (temperature 1e-40 with top_p 0.9 was a poison pill).
FIELDS = ("request_id", "adapter", "input", "temperature", "top_p", "top_k", "penalty", "stop")


def _field(draw: st.DrawFn, hostile: bool, valid: st.SearchStrategy, bad: st.SearchStrategy):
    return draw(bad if hostile else valid)


@st.composite
def requests(draw: st.DrawFn, adapter: str) -> generate_pb2.GenerateRequest:
    odd = draw(st.sets(st.sampled_from(FIELDS), max_size=2))
    text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=60)
    msg = generate_pb2.GenerateRequest(
        request_id=_field(draw, "request_id" in odd, st.sampled_from(["", "dup"]), any_text),
        adapter_id=_field(draw, "adapter" in odd, st.sampled_from(["", adapter]), any_text),
        return_logprobs=draw(st.booleans()),
    )
    which = draw(st.sampled_from(["prompt", "ids", "messages"]))
    if "input" in odd:
        which = draw(st.sampled_from(["prompt", "ids", "messages", "none"]))
    if which == "prompt":
        msg.prompt = _field(draw, "input" in odd, text, any_text)
    elif which == "ids":
        valid_ids = st.lists(st.integers(0, 479), min_size=1, max_size=40)
        msg.prompt_token_ids.ids.extend(_field(draw, "input" in odd, valid_ids, any_ids))
    elif which == "messages":
        roles = st.sampled_from(["system", "user", "assistant"])
        turns = st.lists(st.tuples(roles, text), min_size=1, max_size=3)
        odd_turns = st.lists(st.tuples(roles | st.text(max_size=12), any_text), max_size=4)
        for role, content in _field(draw, "input" in odd, turns, odd_turns):
            msg.messages.messages.add(role=role, content=content)
    s = msg.sampling
    s.temperature = _field(draw, "temperature" in odd, st.floats(0, 100, width=32), any_float)
    s.top_p = _field(draw, "top_p" in odd, st.floats(0, 1, width=32), any_float)
    s.top_k = _field(draw, "top_k" in odd, st.integers(0, 50), st.integers(-(2**31), 2**31 - 1))
    s.repetition_penalty = _field(
        draw, "penalty" in odd, st.sampled_from([0.0, 0.01, 1.0, 1.3, 10.0]), any_float
    )
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    stop = msg.stopping
    stop.max_new_tokens = draw(st.integers(1, 16) | st.sampled_from([0, 2**32 - 1]))
    stops = _field(draw, "stop" in odd, st.lists(text, max_size=2), st.lists(any_text, max_size=18))
    stop.stop.extend(stops)
    stop.ignore_eos = draw(st.booleans())
    return msg


@pytest.mark.parametrize(("target", "examples"), [("shard", EXAMPLES), ("router", EXAMPLES // 2)])
def test_fuzzed_requests_get_a_result_or_a_client_error(
    fleet, tiny, target: str, examples: int
) -> None:
    """Property-based fuzzing of GenerateRequest, bounded in examples and time: a finished
    stream or a precise client error, never INTERNAL, UNKNOWN, a hang or a crash, and no KV
    page leaks."""
    channel = grpc.insecure_channel(fleet[target])
    stub = generate_pb2_grpc.GeneratorStub(channel)

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests(tiny.adapter_ids[0]))
    def property_(request: generate_pb2.GenerateRequest) -> None:
        try:
            messages = list(stub.Generate(request, timeout=30))
        except grpc.RpcError as err:
            assert err.code() in CLIENT_ERRORS, (err.code(), err.details())
            assert err.details() and len(err.details()) < 600, err.details()
            outcomes[err.code().name] += 1
            return
        assert messages[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
        assert all(t < 480 for m in messages for t in m.token_ids)
        outcomes["OK"] += 1

    outcomes: collections.Counter[str] = collections.Counter()
    try:
        property_()
    finally:
        channel.close()
    # The fuzz reached generation, not only the edge's checks.
    assert outcomes["OK"] >= examples // 10, outcomes
    _wait_idle(fleet["shard"])
    assert tokens(call(fleet["shard"], NORMAL)) == fleet["baseline"]


def _long(request_id: str = "", new: int = 100) -> generate_pb2.GenerateRequest:
    msg = generate_pb2.GenerateRequest()
    msg.CopyFrom(NORMAL)
    msg.request_id = request_id
    msg.stopping.max_new_tokens = new
    return msg


def _idle(address: str) -> bool:
    snapshot = load_snapshot(address)
    return (
        snapshot.running == snapshot.queued == 0
        and snapshot.kv_pages_free == snapshot.kv_pages_total
    )


def _wait_idle(address: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not _idle(address):
        assert time.monotonic() < deadline, load_snapshot(address)
        time.sleep(0.05)


@pytest.mark.parametrize("target", ["router", "shard"])
def test_a_cancellation_storm_leaves_every_kv_page_free(fleet, target: str) -> None:
    rng = random.Random(target)
    with grpc.insecure_channel(fleet[target]) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        streams = [stub.Generate(_long(f"storm-{i}"), timeout=60) for i in range(24)]
        for stream in streams:
            for _ in range(rng.choice((0, 0, 1, 2, 5))):
                next(stream)
            stream.cancel()
    _wait_idle(fleet["shard"])
    assert tokens(call(fleet[target], NORMAL)) == fleet["baseline"]


def test_duplicate_request_ids_straight_to_a_shard_do_not_interfere(fleet) -> None:
    alone = tokens(call(fleet["shard"], _long("solo", 40)))
    with grpc.insecure_channel(fleet["shard"]) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        first, second = (stub.Generate(_long("dup", 40), timeout=60) for _ in range(2))
        head = list(next(second).token_ids)
        next(first)
        first.cancel()  # once cancelled the other by id; a finished one removed the shared entry
        started = time.monotonic()
        rest = [t for m in second for t in m.token_ids]
    assert head + rest == alone
    assert time.monotonic() - started < 10, "the survivor crawled"
    _wait_idle(fleet["shard"])


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_a_short_soak_keeps_shard_memory_flat(fleet) -> None:
    """Mixed traffic (finished, cancelled and refused requests) through the router; the shard's
    resident memory after warm-up stays flat. LORAFLEET_SOAK_S sets a longer soak."""
    seconds = float(os.environ.get("LORAFLEET_SOAK_S", "4"))
    requests_ = [_long("soak", 12), _long("soak", 40), _req(adapter_id="no-such"), _ids(480)]

    def traffic(until: float, seed: int) -> int:
        rng, done = random.Random(seed), 0
        with grpc.insecure_channel(fleet["router"]) as channel:
            stub = generate_pb2_grpc.GeneratorStub(channel)
            while time.monotonic() < until:
                stream = stub.Generate(rng.choice(requests_), timeout=60)
                try:
                    for i, _ in enumerate(stream):
                        if i == 3 and rng.random() < 0.3:
                            stream.cancel()
                except grpc.RpcError as err:
                    assert err.code() in (
                        grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.NOT_FOUND,
                        grpc.StatusCode.INVALID_ARGUMENT,
                    ), err
                done += 1
        return done

    def phase(length: float) -> int:
        until = time.monotonic() + length
        with ThreadPoolExecutor(4) as pool:
            return sum(pool.map(lambda seed: traffic(until, seed), range(4)))

    phase(2.0)  # warm-up: allocator pools, adapter loads, first-use caches
    before = _rss_mb(fleet["pid"])
    served = phase(seconds)
    after = _rss_mb(fleet["pid"])
    _wait_idle(fleet["shard"])
    assert served > 20, served
    assert after - before < 25 + seconds * 0.5, (before, after, served)
