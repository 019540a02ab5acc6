"""One step's forward and sampling, run so that a request's fault stays that request's.

The batched forward and the batched sampling run first, as always. Only when one raises a fault
that is not process-wide (see `shard.faults`) does each request run alone, and only those that
fail alone are handed to `fail`; the others keep their results. Re-running a forward is safe:
it writes the same KV slots again, and no sequence has advanced yet.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import torch

from shard.faults import is_process_fault
from shard.sampling import sample
from shard.sequence import Sequence
from shard.step_plan import StepPlan, make_plan

log = structlog.get_logger(__name__)

Fail = Callable[[Sequence, Exception], None]


def run_forward(
    forward: Callable[[StepPlan], torch.Tensor],
    decode: list[Sequence],
    prefill: list[Sequence],
    page_size: int,
    retry_alone: bool,
    fail: Fail,
) -> tuple[torch.Tensor, list[Sequence], set[Sequence]]:
    """Logits [B, V] of the step, the sequences of its rows and which of them are prefills.

    `retry_alone` False (tensor parallelism: followers replay every forward) re-raises instead.
    """
    plan, order = make_plan(decode, prefill, page_size)
    try:
        return forward(plan), order, set(prefill)
    except Exception as exc:
        if is_process_fault(exc) or not retry_alone:
            raise
        if len(order) == 1:
            fail(order[0], exc)
            return torch.empty(0), [], set()
        log.warning("batched forward failed: running its requests one by one", error=str(exc))
    rows, survivors = [], []
    for seq in order:
        alone = ([seq], []) if seq in decode else ([], [seq])
        try:
            rows.append(forward(make_plan(*alone, page_size)[0]))
        except Exception as exc:
            if is_process_fault(exc):
                raise
            fail(seq, exc)
            continue
        survivors.append(seq)
    logits = torch.cat(rows) if rows else torch.empty(0)
    return logits, survivors, set(prefill) & set(survivors)


def sample_tokens(
    logits: torch.Tensor, order: list[Sequence], fail: Fail
) -> list[tuple[Sequence, int, float]]:
    """One token and its logprob per sequence (logits row i is order[i])."""
    try:
        tokens, logprobs = _sample(logits, order)
        return list(zip(order, tokens, logprobs, strict=True))
    except Exception as exc:
        if is_process_fault(exc):
            raise
    rows = []
    for i, seq in enumerate(order):
        try:
            tokens, logprobs = _sample(logits[i : i + 1], [seq])
        except Exception as exc:
            if is_process_fault(exc):
                raise
            fail(seq, exc)
            continue
        rows.append((seq, tokens[0], logprobs[0]))
    return rows


def _sample(logits: torch.Tensor, order: list[Sequence]) -> tuple[list[int], list[float]]:
    tokens, logprobs = sample(
        logits,
        [s.req.sampling for s in order],
        [s.token_ids for s in order],
        [len(s.generated) for s in order],
    )
    return tokens.tolist(), logprobs.tolist()
