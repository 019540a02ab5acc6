"""One request's fault fails that request only: the step loop goes on, exact for the others."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from shard.engine.engine import Engine, NeverFitsError
from shard.engine.executor import Executor
from shard.engine.faults import RequestFault, is_process_fault
from shard.engine.sampling import SamplingParams
from shard.engine.sequence import Resume
from shard.engine.step_plan import Step
from shard.parallel.group import GroupLost
from tests.test_engine import Collector, make_engine, reference, request

POISON = 479  # a valid id of the tiny vocabulary that the wrapped forward below refuses


@pytest.fixture(scope="module")
def engine(tiny) -> Iterator[Engine]:
    """One engine for the module; its forward raises whenever a row holds POISON, like a bug
    that one request's input triggers."""
    engine = make_engine(tiny)
    engine.executor = Fragile(engine.executor)
    yield engine
    engine.stop()


class Fragile:
    """An executor that raises whenever a row holds POISON, and otherwise runs `inner`'s."""

    retry_alone = True

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    def execute(self, step: Step) -> torch.Tensor:
        if POISON in step.plan.input_ids:
            raise IndexError("row holds the poison id")
        return self.inner.execute(step)


def run(engine: Engine, reqs) -> list[Collector]:
    sinks = [Collector() for _ in reqs]
    for req, sink in zip(reqs, sinks, strict=True):
        engine.submit(req, sink)
    for sink in sinks:
        assert sink.done.wait(120)
    return sinks


def assert_engine_clean(engine: Engine) -> None:
    assert engine.alive
    load = engine.load()
    assert (load.running, load.queued, load.kv_pages_free) == (0, 0, load.kv_pages_total)


def test_a_failing_forward_row_fails_only_its_request(engine: Engine, tiny) -> None:
    good = [("", [5, 17, 42]), (tiny.adapter_ids[0], [7, 8, 9, 10])]
    reqs = [request(f"g{i}", a, p) for i, (a, p) in enumerate(good)]
    reqs.insert(1, request("bad", "", [3, POISON, 4]))
    sinks = run(engine, reqs)
    err = sinks[1].outputs[-1].error
    assert isinstance(err, RequestFault) and not err.invalid
    assert "IndexError" in str(err) and "'bad'" in str(err)
    for (adapter, prompt), sink in zip(good, [sinks[0], sinks[2]], strict=True):
        assert sink.outputs[-1].error is None
        assert sink.tokens == reference(tiny, adapter, prompt)[0]
    assert_engine_clean(engine)


def test_a_failing_sampling_row_fails_only_its_request(engine: Engine, tiny) -> None:
    broken = SamplingParams(temperature="hot", seed=1)  # type: ignore[arg-type]
    bad = dataclasses.replace(request("bad", "", [1, 2, 3]), sampling=broken)
    sinks = run(engine, [request("good", "", [5, 17, 42]), bad])
    assert isinstance(sinks[1].outputs[-1].error, RequestFault)
    assert sinks[0].tokens == reference(tiny, "", [5, 17, 42])[0]
    assert_engine_clean(engine)


def test_resume_ids_outside_the_vocabulary_fail_only_that_request(engine: Engine, tiny) -> None:
    bad = dataclasses.replace(request("bad", "", [1, 2, 3]), resume=Resume((10**6,)))
    sinks = run(engine, [bad, request("good", "", [5, 17, 42])])
    assert isinstance(sinks[0].outputs[-1].error, RequestFault)
    assert sinks[1].tokens == reference(tiny, "", [5, 17, 42])[0]
    assert_engine_clean(engine)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-40, top_p=0.9, seed=7),
        SamplingParams(temperature=1e-40, top_k=1, repetition_penalty=0.01, seed=7),
        SamplingParams(temperature=100.0, top_p=1e-9, repetition_penalty=10.0, seed=7),
    ],
)
def test_extreme_accepted_sampling_parameters_generate(
    engine: Engine, params: SamplingParams
) -> None:
    params.validate()
    req = dataclasses.replace(request("x", "", [5, 17, 42], new=8), sampling=params)
    (sink,) = run(engine, [req])
    assert sink.outputs[-1].error is None and len(sink.tokens) == 8
    assert all(0 <= t < 480 for t in sink.tokens)
    assert all(lp == lp and lp <= 0 for lp in sink.logprobs)  # no NaN
    assert_engine_clean(engine)


def test_a_request_that_can_never_fit_the_pool_fails_at_once(tiny) -> None:
    engine = make_engine(tiny, "--kv-pages", "8")  # 32 tokens of 4-token pages
    try:
        with pytest.raises(NeverFitsError, match=r"whole KV pool has 8 pages .* at most 28"):
            engine.submit(request("big", "", [1, 2, 3, 4], new=29), Collector())
        (sink,) = run(engine, [request("fits", "", [1, 2, 3, 4], new=28)])
        assert len(sink.tokens) == 28
        assert_engine_clean(engine)
    finally:
        engine.stop()


def test_a_duplicate_engine_id_is_refused_without_touching_the_first(engine: Engine, tiny) -> None:
    first, second = Collector(), Collector()
    engine.submit(request("same", "", [5, 17, 42]), first)
    engine.submit(request("same", "", [7, 8, 9]), second)
    assert first.done.wait(60) and second.done.wait(60)
    assert isinstance(second.outputs[-1].error, RequestFault)
    assert first.tokens == reference(tiny, "", [5, 17, 42])[0]
    assert_engine_clean(engine)


@pytest.mark.parametrize(
    ("exc", "process"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (GroupLost("rank 1 is gone"), True),
        (MemoryError(), True),
        (KeyboardInterrupt(), True),
        (torch.OutOfMemoryError("CUDA out of memory"), False),
        (IndexError("index out of range in self"), False),
        (ValueError("bad"), False),
        (RuntimeError("shape mismatch"), False),
    ],
)
def test_process_faults_are_told_from_request_faults(exc: BaseException, process: bool) -> None:
    assert is_process_fault(exc) is process
