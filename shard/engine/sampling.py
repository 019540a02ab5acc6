"""Batched next-token sampling: greedy, temperature, top-k, top-p, repetition penalty.

Every sampled row draws its randomness from its own generator seeded with (seed, step), so a
request's tokens depend only on its seed and its logits: not on the batch it ran in, and not on
which shard generated its earlier tokens (a resumed request continues the same random stream).
The draw is one exponential variate per vocabulary entry: `argmax(p / q)` with `q ~ Exp(1)` picks
token `i` with probability `p_i` (the exponential race, equivalent to the Gumbel-max trick).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from itertools import chain

import torch

_MASK64 = (1 << 64) - 1
# Temperatures below this are served at this value: dividing logits by a subnormal temperature
# overflows to inf and the softmax to NaN. At 1e-3 a logit gap of 0.1 is already e^100 apart,
# so the draw is the argmax for every practical purpose.
MIN_TEMPERATURE = 1e-3
# Repetition penalties below this are refused: dividing a logit by a tiny penalty overflows.
MIN_REPETITION_PENALTY = 1e-2


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick a request's next token. The defaults pick the most likely token."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    repetition_penalty: float = 1.0  # >1 makes prompt and generated tokens less likely
    seed: int | None = None  # required to sample; the engine draws one when the client did not

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax, with no randomness."""
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise `ValueError` naming the first field out of range."""
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(
                f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        # isclose: a float32 0.01 off the wire reads as 0.0099999997.
        penalty = self.repetition_penalty
        if not (
            MIN_REPETITION_PENALTY <= penalty <= 10.0
            or math.isclose(penalty, MIN_REPETITION_PENALTY, rel_tol=1e-6)
        ):
            raise ValueError(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 10] (1 = off), "
                f"got {self.repetition_penalty}"
            )
        if self.seed is not None and not 0 <= self.seed <= _MASK64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seen_ids: list[list[int]],
    steps: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row.

    logits: [B, V] float32, on any device. `params[i]`, `seen_ids[i]` (the prompt and generated
    ids of row i's request, for the repetition penalty) and `steps[i]` (the index of the token
    being generated in that request) describe row i; non-greedy rows need a seed.
    Returns token ids [B] int64 and their logprobs [B] float32: log-softmax of the logits after
    the repetition penalty and before temperature, top-k and top-p.
    Seeded draws are reproducible on one device type (CPU and CUDA generators differ).
    """
    batch = logits.shape[0]
    if not len(params) == len(seen_ids) == len(steps) == batch:
        raise ValueError(
            f"logits has {batch} rows but got {len(params)} params, {len(seen_ids)} seen_ids "
            f"and {len(steps)} steps"
        )
    logits = _apply_repetition_penalty(logits.float(), params, seen_ids)
    tokens = logits.argmax(dim=-1)  # [B]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        sampled = _sample_rows(
            logits.index_select(0, index), [params[i] for i in rows], [steps[i] for i in rows]
        )
        tokens = tokens.index_copy(0, index, sampled)
    chosen = logits.gather(1, tokens[:, None]).squeeze(1)  # [B]
    return tokens, chosen - logits.logsumexp(dim=-1)


def _apply_repetition_penalty(
    logits: torch.Tensor, params: list[SamplingParams], seen_ids: list[list[int]]
) -> torch.Tensor:
    """Divide positive logits of seen tokens by the penalty, multiply negative ones (CTRL)."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and seen_ids[i]]
    if not rows:
        return logits
    device = logits.device
    # array() packs the ids in C: ~3x faster than torch.tensor on nested Python lists.
    cols = torch.frombuffer(
        array("q", chain.from_iterable(seen_ids[i] for i in rows)), dtype=torch.int64
    )
    lengths = torch.tensor([len(seen_ids[i]) for i in rows])
    penalty = torch.tensor([params[i].repetition_penalty for i in rows]).repeat_interleave(lengths)
    index = (torch.tensor(rows).repeat_interleave(lengths).to(device), cols.to(device))  # [N] x2
    seen = logits[index]  # [N]; a repeated id is written twice with the same value
    penalty = penalty.to(device)
    return logits.index_put(index, torch.where(seen > 0, seen / penalty, seen * penalty))


def _sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], steps: list[int]
) -> torch.Tensor:
    """Temperature, top-k, top-p and one seeded exponential race per row. logits: [S, V]."""
    device = logits.device
    vocab = logits.shape[1]
    temperature = torch.tensor(
        [[max(p.temperature, MIN_TEMPERATURE)] for p in params], device=device
    )  # [S, 1]
    top_k = torch.tensor([[p.top_k or vocab] for p in params], device=device)  # [S, 1]
    top_p = torch.tensor([[p.top_p] for p in params], device=device)  # [S, 1]
    scaled = logits / temperature
    ordered = scaled.sort(dim=-1, descending=True).values  # [S, V]
    rank = torch.arange(vocab, device=device)[None]  # [1, V]
    ordered = ordered.masked_fill(rank >= top_k, -math.inf)
    probs = torch.softmax(ordered, dim=-1)
    # A token stays when the tokens above it hold less than top_p of the mass.
    keep = (probs.cumsum(dim=-1) - probs < top_p) | (top_p >= 1.0)
    keep &= rank < top_k
    keep[:, 0] = True  # the most likely token always stays, even if the mass is not finite
    last_kept = keep.sum(dim=-1, keepdim=True) - 1  # [S, 1]; keep is a prefix, never empty
    threshold = ordered.gather(1, last_kept)  # [S, 1]
    noise = torch.empty_like(logits)  # [S, V], Exp(1) per token id
    for row, (p, step) in enumerate(zip(params, steps, strict=True)):
        if p.seed is None:
            raise ValueError("a sampled row needs a seed; the engine must fill one in")
        generator = torch.Generator(device=device).manual_seed(_mix(p.seed, step))
        noise[row].exponential_(generator=generator)
    scores = scaled - noise.clamp_min(1e-30).log()  # log(p / q) up to a per-row constant
    return scores.masked_fill(scaled < threshold, -math.inf).argmax(dim=-1)


def _mix(seed: int, step: int) -> int:
    """A 64-bit generator seed for (seed, step): splitmix64 of both, so nearby pairs differ."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
