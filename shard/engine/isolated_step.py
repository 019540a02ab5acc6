"""One step's forward and sampling, run so that a request's fault stays that request's.

The batched forward and the batched sampling run first, as always. Only when one raises a fault
that is not process-wide (see `shard.engine.faults`) does each request run alone, and only those
that fail alone are handed to `fail`; the others keep their results. Re-running a forward is
safe: it writes the same KV slots again, and no sequence has advanced yet (a sequence's cached
count moves only once its rows have run).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import torch

from shard.engine.executor import Executor
from shard.engine.faults import is_process_fault
from shard.engine.sampling import sample
from shard.engine.sequence import Sequence
from shard.engine.step_plan import Chunk, make_step

log = structlog.get_logger(__name__)

Fail = Callable[[Sequence, Exception], None]


def run_forward(
    executor: Executor,
    decode: list[Sequence],
    prefill: list[Chunk],
    page_size: int,
    fail: Fail,
) -> tuple[torch.Tensor, list[Sequence], set[Sequence]]:
    """Logits [B, V] of the step's sampled rows, the sequences of those rows and which of them
    ended their prompt in this step (a prefill chunk that does not end it is not sampled). Every
    sequence whose rows ran has their keys and values marked cached (`num_cached`).

    An executor that cannot retry alone (tensor parallelism: the followers replay every
    forward) re-raises instead.
    """
    step, order = make_step(decode, prefill, page_size)
    ending = {c.seq for c in prefill if c.last}
    try:
        logits = executor.execute(step)
    except Exception as exc:
        if is_process_fault(exc) or not executor.retry_alone:
            raise
        if len(decode) + len(prefill) == 1:
            fail(decode[0] if decode else prefill[0].seq, exc)
            return torch.empty(0), [], set()
        log.warning("batched forward failed: running its requests one by one", error=str(exc))
    else:
        for seq in decode:
            seq.num_cached = len(seq.token_ids)
        for chunk in prefill:
            chunk.seq.num_cached = chunk.end
        return logits, order, ending
    rows, survivors = [], []
    parts: list[tuple[list[Sequence], list[Chunk]]] = [([seq], []) for seq in decode]
    parts += [([], [chunk]) for chunk in prefill]
    for alone_decode, alone_chunk in parts:
        seq = alone_decode[0] if alone_decode else alone_chunk[0].seq
        try:
            part, sampled = make_step(alone_decode, alone_chunk, page_size)
            out = executor.execute(part)
        except Exception as exc:
            if is_process_fault(exc):
                raise
            fail(seq, exc)
            continue
        seq.num_cached = alone_chunk[0].end if alone_chunk else len(seq.token_ids)
        if sampled:
            rows.append(out)
            survivors.append(seq)
    logits = torch.cat(rows) if rows else torch.empty(0)
    return logits, survivors, ending & set(survivors)


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
