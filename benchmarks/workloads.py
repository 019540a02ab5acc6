"""What the text-generation benchmarks run: model shapes, Punica's adapter popularities, seeded
workloads, and the result rows every system reports."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks.bench_sgmv import adapters_of_rows
from benchmarks.timing import median_ms
from shard.engine.kv_cache import KvCache, pages_for
from shard.engine.step_plan import Step, StepPlan
from shard.model.lora_weights import AdapterWeights

POPULARITY = ("distinct", "uniform", "skewed", "identical")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "llama2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    # For a CPU smoke run of the whole benchmark (tests/test_bench_textgen.py).
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 512,
    },
}


@dataclass(frozen=True, slots=True)
class Workload:
    name: str  # popularity case
    prompts: list[list[int]]
    outputs: list[int]  # new tokens per request
    adapters: list[str]  # per request; "" = base model

    @property
    def batch(self) -> int:
        return len(self.prompts)

    def on_base(self) -> Workload:
        return Workload(self.name, self.prompts, self.outputs, [""] * len(self.prompts))


@dataclass(slots=True)
class Result:
    system: str  # lorafleet | lorafleet-base | peft | hf-base
    case: str
    batch: int
    tokens_per_s: float  # generated tokens over wall time, prefill included
    decode_tokens_per_s: float  # batch / decode step
    step_ms: float  # decode step: p50 inter-token latency (lorafleet) or timed (transformers)
    ttft_p50_ms: float
    ttft_p99_ms: float
    extra: dict[str, float] = field(default_factory=dict)


Lengths = tuple[tuple[int, int], tuple[int, int]]  # (prompt lo, hi), (output lo, hi)


def make_workload(
    case: str, batch: int, adapters: int, seed: int, lengths: Lengths, vocab: int
) -> Workload:
    """Seeded prompts (random ids) and output lengths; adapters by Punica's popularity."""
    rng = random.Random(f"{seed}-{case}-{batch}")
    (p_lo, p_hi), (o_lo, o_hi) = lengths
    prompts = [
        [rng.randrange(3, vocab) for _ in range(rng.randint(p_lo, p_hi))] for _ in range(batch)
    ]
    outputs = [rng.randint(o_lo, o_hi) for _ in range(batch)]
    picks = adapters_of_rows(case, batch, rng)
    if max(picks) >= adapters:
        raise ValueError(f"{case} at batch {batch} needs {max(picks) + 1} adapters ({adapters})")
    rng.shuffle(picks)
    return Workload(case, prompts, outputs, [f"a{i}" for i in picks])


def format_row(r: Result) -> str:
    return (
        f"{r.system:15s} {r.case:9s} B={r.batch:3d}  {r.tokens_per_s:9.1f} tok/s  "
        f"decode {r.decode_tokens_per_s:9.1f} tok/s  step {r.step_ms:8.2f} ms  "
        f"TTFT p50 {r.ttft_p50_ms:8.1f} ms"
    )


def decode_plan(kv: KvCache, adapters: list[str], context: int) -> tuple[StepPlan, list[int]]:
    """One decode row per entry of `adapters` (sorted into segments), each at `context` tokens,
    on pages taken from the pool (give them back)."""
    rows = sorted(adapters)
    per_seq = pages_for(context, kv.page_size)
    pages = kv.pool.alloc(per_seq * len(rows))
    assert pages is not None, "no KV pages free for the decode plan"
    tables = [tuple(pages[i * per_seq : (i + 1) * per_seq]) for i in range(len(rows))]
    segments: list[tuple[int, str]] = []
    for row, adapter in enumerate(rows):
        if not segments or segments[-1][1] != adapter:
            segments.append((row, adapter))
    last = context - 1
    plan = StepPlan(
        input_ids=tuple(7 for _ in rows),
        positions=tuple(last for _ in rows),
        slots=tuple(t[last // kv.page_size] * kv.page_size + last % kv.page_size for t in tables),
        decode_pages=tuple(tables),
        decode_context=tuple(context for _ in rows),
        prefills=(),
        logits_rows=tuple(range(len(rows))),
        segments=tuple(segments),
        adapters=tuple(sorted({a for a in rows if a})),
    )
    return plan, pages


def decode_step(
    kv: KvCache, weights_of: Callable[[str], AdapterWeights], adapters: list[str], context: int
) -> tuple[Step, list[int]]:
    """`decode_plan`'s plan with each segment's adapter weights from `weights_of` (the adapter
    cache's `weights`), as the scheduler would have claimed them."""
    plan, pages = decode_plan(kv, adapters, context)
    return Step(plan, tuple(weights_of(key) if key else None for _, key in plan.segments)), pages


def decode_step_ms(
    kv: KvCache,
    run: Callable[[Step], object],
    weights_of: Callable[[str], AdapterWeights],
    device: torch.device,
    adapters: list[str],
    context: int,
    reps: int = 20,
) -> float:
    """Median time of `run` (a model runner's forward or an executor's execute) on one decode
    step of `adapters`' rows at `context` tokens each (see `decode_step`); CUDA events on a GPU.
    The step's pages go back to the pool."""
    step, pages = decode_step(kv, weights_of, adapters, context)
    try:
        return median_ms(lambda: run(step), device, reps)
    finally:
        kv.pool.release(pages)
