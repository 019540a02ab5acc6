"""Batched sampling: greedy, seeded and resumable draws, top-k/top-p support, penalties."""

from __future__ import annotations

import math

import pytest
import torch

from shard.engine.sampling import SamplingParams, sample

GREEDY = SamplingParams()


def _logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _sample_one(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    tokens, _ = sample(logits[None], [params], [[]], [step])
    return int(tokens[0])


def _draws(probs: list[float], params: SamplingParams, n: int) -> torch.Tensor:
    """`n` draws from one distribution: n rows, each its own seed (so the loop is one call)."""
    logits = torch.tensor(probs).log().expand(n, -1).contiguous()
    batch = [
        SamplingParams(params.temperature, params.top_p, params.top_k, 1.0, seed)
        for seed in range(n)
    ]
    tokens, _ = sample(logits, batch, [[] for _ in range(n)], [0] * n)
    return torch.bincount(tokens, minlength=len(probs)).float() / n


def test_greedy_is_argmax_with_logprobs() -> None:
    logits = _logits(7, 101)
    tokens, logprobs = sample(logits, [GREEDY] * 7, [[] for _ in range(7)], list(range(7)))
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, logits.argmax(-1))
    want = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, want)


def test_top_k_one_is_greedy() -> None:
    logits = _logits(9, 64, seed=1)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(9)]
    tokens, _ = sample(logits, params, [[] for _ in range(9)], [3] * 9)
    assert torch.equal(tokens, logits.argmax(-1))


def test_tiny_top_p_is_greedy() -> None:
    logits = _logits(9, 64, seed=2)
    params = [SamplingParams(temperature=1.0, top_p=1e-6, seed=s) for s in range(9)]
    tokens, _ = sample(logits, params, [[] for _ in range(9)], [0] * 9)
    assert torch.equal(tokens, logits.argmax(-1))


def test_logprobs_ignore_temperature_and_filters() -> None:
    logits = _logits(5, 32, seed=3)
    params = [SamplingParams(temperature=0.7, top_k=4, top_p=0.9, seed=s) for s in range(5)]
    tokens, logprobs = sample(logits, params, [[] for _ in range(5)], [0] * 5)
    want = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, want)


def test_same_seed_same_tokens_and_seeds_differ() -> None:
    logits = _logits(1, 50, seed=4)[0]
    params = SamplingParams(temperature=2.0, seed=123)
    run = [_sample_one(logits, params, step) for step in range(40)]
    assert run == [_sample_one(logits, params, step) for step in range(40)]
    other = [_sample_one(logits, SamplingParams(temperature=2.0, seed=124), s) for s in range(40)]
    assert run != other
    assert len(set(run)) > 5


def test_resumed_step_equals_step_within_a_run() -> None:
    vocab, steps = 40, 25
    logits = _logits(steps, vocab, seed=5)  # row n: the logits of step n
    me = SamplingParams(temperature=1.0, top_p=0.95, seed=2**64 - 7)
    neighbours = [SamplingParams(temperature=0.8, top_k=10, seed=s) for s in range(3)] + [GREEDY]
    within = []
    for step in range(steps):
        # A batch of 5 with this request in the middle, other requests around it.
        batch = torch.cat([_logits(2, vocab, seed=100 + step), logits[step : step + 1]])
        batch = torch.cat([batch, _logits(2, vocab, seed=200 + step)])
        params = [*neighbours[:2], me, *neighbours[2:]]
        tokens, _ = sample(batch, params, [[] for _ in range(5)], [step, 0, step, 7, 9])
        within.append(int(tokens[2]))
    alone = [_sample_one(logits[n], me, n) for n in range(steps)]
    assert within == alone
    assert len(set(alone)) > 3


def test_temperature_sampling_matches_the_distribution() -> None:
    probs = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
    freq = _draws(probs, SamplingParams(temperature=1.0), 4000)
    torch.testing.assert_close(freq, torch.tensor(probs), atol=0.03, rtol=0)
    # Temperature 0.5 squares the probabilities before renormalizing.
    sharp = torch.tensor(probs) ** 2
    freq = _draws(probs, SamplingParams(temperature=0.5), 4000)
    torch.testing.assert_close(freq, sharp / sharp.sum(), atol=0.03, rtol=0)


def test_top_k_restricts_the_support() -> None:
    probs = [0.3, 0.05, 0.2, 0.15, 0.1, 0.2]
    freq = _draws(probs, SamplingParams(temperature=1.0, top_k=3), 3000)
    assert set(freq.nonzero().flatten().tolist()) == {0, 2, 5}
    torch.testing.assert_close(freq[[0, 2, 5]], torch.tensor([3, 2, 2]) / 7, atol=0.04, rtol=0)


def test_top_p_restricts_the_support() -> None:
    probs = [0.5, 0.3, 0.1, 0.05, 0.05]
    freq = _draws(probs, SamplingParams(temperature=1.0, top_p=0.75), 3000)
    assert set(freq.nonzero().flatten().tolist()) == {0, 1}
    torch.testing.assert_close(freq[:2], torch.tensor([5, 3]) / 8, atol=0.04, rtol=0)
    freq = _draws(probs, SamplingParams(temperature=1.0, top_p=0.85), 3000)
    assert set(freq.nonzero().flatten().tolist()) == {0, 1, 2}
    freq = _draws(probs, SamplingParams(temperature=1.0, top_p=0.85, top_k=1), 200)
    assert set(freq.nonzero().flatten().tolist()) == {0}


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5, -0.5]])
    params = [SamplingParams(repetition_penalty=2.0)]
    tokens, logprobs = sample(logits, params, [[0, 1, 0]], [0])
    # Token 0: 2.0 / 2 = 1.0 < 1.5, so greedy moves to token 2; token 1: -1.0 * 2 = -2.0.
    penalized = torch.tensor([[1.0, -2.0, 1.5, 0.5, -0.5]])
    assert int(tokens[0]) == 2
    torch.testing.assert_close(logprobs, torch.log_softmax(penalized, -1)[:, 2])
    # Rows without a penalty in the same batch are untouched.
    both = torch.cat([logits, logits])
    tokens, _ = sample(both, [*params, GREEDY], [[0, 1], [0, 1]], [0, 0])
    assert tokens.tolist() == [2, 0]
    # A penalty below 1 favours seen tokens.
    tokens, _ = sample(logits, [SamplingParams(repetition_penalty=0.2)], [[3]], [0])
    assert int(tokens[0]) == 3


def test_sampled_row_without_seed_is_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        sample(_logits(1, 8), [SamplingParams(temperature=1.0)], [[]], [0])


def test_mismatched_batch_is_rejected() -> None:
    with pytest.raises(ValueError, match="2 rows"):
        sample(_logits(2, 8), [GREEDY], [[]], [0])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(temperature=-0.1), "temperature must be in"),
        (SamplingParams(temperature=101.0), "temperature must be in"),
        (SamplingParams(temperature=math.nan), "temperature must be in"),
        (SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (SamplingParams(top_p=1.5), "top_p must be in"),
        (SamplingParams(top_k=-1), "top_k must be >= 0"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty must be in"),
        (SamplingParams(repetition_penalty=11.0), "repetition_penalty must be in"),
        (SamplingParams(seed=-1), "seed must be in"),
        (SamplingParams(seed=2**64), "seed must be in"),
    ],
)
def test_validate_rejects_out_of_range(params: SamplingParams, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        params.validate()


def test_validate_accepts_edges() -> None:
    for params in (
        SamplingParams(),
        SamplingParams(temperature=100.0, top_p=1.0, top_k=0, repetition_penalty=10.0),
        SamplingParams(temperature=1e-3, top_p=1e-3, top_k=5, repetition_penalty=0.5, seed=0),
        SamplingParams(seed=2**64 - 1),
    ):
        params.validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_greedy_and_reproduces_seeded_draws() -> None:
    logits = _logits(6, 1000)
    logits[5] = logits[4]
    logits = logits.cuda()
    params = [GREEDY, GREEDY, *(SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in (1, 2))]
    params += [SamplingParams(temperature=0.5, top_k=20, repetition_penalty=1.3, seed=3)] * 2
    seen = [[1, 2], [], [], [5], [7, 8], [7, 8]]
    tokens, logprobs = sample(logits, params, seen, [0, 1, 2, 3, 4, 4])
    again, _ = sample(logits, params, seen, [0, 1, 2, 3, 4, 4])
    assert tokens.is_cuda and torch.equal(tokens, again)
    assert int(tokens[4]) == int(tokens[5])
    alone, _ = sample(logits[2:3], params[2:3], seen[2:3], [2])
    assert int(alone[0]) == int(tokens[2])
    cpu_tokens, cpu_logprobs = sample(logits[:2].cpu(), params[:2], seen[:2], [0, 1])
    assert torch.equal(tokens[:2].cpu(), cpu_tokens)
    torch.testing.assert_close(logprobs[:2].cpu(), cpu_logprobs)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_tiny_temperatures_are_served_safely(scale: float) -> None:
    # 1e-40 is subnormal in float32: dividing by it overflowed to inf, the softmax to NaN and
    # top-p kept no token, which once raised in the engine thread and ended the shard.
    logits = _logits(3, 64) * scale
    params = [SamplingParams(temperature=t, top_p=0.9, seed=1) for t in (1e-40, 1e-7, 1e-3)]
    tokens, logprobs = sample(logits, params, [[], [], []], [0, 0, 0])
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert torch.isfinite(logprobs).all()


def test_tiny_repetition_penalty_is_refused() -> None:
    with pytest.raises(ValueError, match=r"repetition_penalty must be in \[0.01, 10\]"):
        SamplingParams(repetition_penalty=1e-40).validate()
