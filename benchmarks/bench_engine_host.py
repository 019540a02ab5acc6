"""Host time of one engine decode step, phase by phase, with the forward taken out.

The real `Engine`, `Scheduler`, `PagePool`, `AdapterCache` and `TextStream` run around a stub
forward that returns vocabulary-sized logits at once: the step's time is then all host time, the
time the GPU would sit idle between two forwards. The tokenizer is a byte-level BPE of a few
thousand tokens trained on Python's own documentation (with some multi-byte text mixed in), and
the stub's logits pick the next token of that text, so every request detokenizes real text.
The benchmark drives `Engine._step` on its own thread: the timings hold no thread hand-offs.
`sample` here includes the CPU's math on the logits, which a GPU does in kernels; on a GPU its
host time is the launches and the wait for the tokens.

    python -m benchmarks.bench_engine_host [--batches 1,8,32,64] [--steps 400] [--out f.json]

`--mixed 8:16,32:256` adds the mixed-step case (benchmarks/mixed_step.py) on a real engine and
model runner: a tiny model with the layer count of a 7B model (`--mixed-layers`) but narrow
layers, whose step time on a CPU is then mostly the host's Python in and around the forward.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import itertools
import json
import pstats
import pydoc_data.topics
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import shard.engine.isolated_step
from benchmarks.mixed_step import measure_mixed, start_decodes
from benchmarks.timing import provenance
from shard.adapters.cache import AdapterCache
from shard.engine.detokenizer import TextStream
from shard.engine.engine import Engine
from shard.engine.kv_cache import PagePool
from shard.engine.sampling import SamplingParams
from shard.engine.scheduler import Scheduler
from shard.engine.sequence import EngineRequest, StepOutput, StopParams
from shard.engine.step_plan import Step
from shard.metrics import ShardMetrics
from shard.model.config import ModelConfig
from shard.parallel.group import SINGLE

PAGE_SIZE = 16
MAX_CONTEXT = 4096
# Mixed into the corpus so that generated text holds characters of 2, 3 and 4 UTF-8 bytes.
MULTILINGUAL = "Señor Müller paid 5 € for crème brûlée; 東京は大きい都市です 🙂🚀 αβγ привет.\n"
# Never in the corpus: requests check stop strings on every token but run to their length.
STOP = ("\nUser:", "</answer>")
PHASES = ("schedule", "plan", "sample", "advance", "publish")


def corpus() -> str:
    return "".join(doc + MULTILINGUAL for doc in pydoc_data.topics.topics.values())


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `<s>` and `</s>`, as Llama 3 style tokenizers are."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tokenizer


class StubForward:
    """Logits [B, V] that make the token after position p the text's token p + 1, at once."""

    def __init__(self, text_ids: torch.Tensor, vocab: int) -> None:
        self.text_ids = text_ids  # [N]
        self.base = torch.randn(vocab, generator=torch.Generator().manual_seed(0))  # [V]
        self.seconds = 0.0

    retry_alone = True

    def execute(self, step: Step) -> torch.Tensor:
        plan = step.plan
        start = time.perf_counter()
        rows = torch.tensor(plan.logits_rows)
        after = (torch.tensor(plan.positions)[rows] + 1) % len(self.text_ids)  # [B]
        logits = self.base.expand(len(rows), -1).clone()  # [B, V]
        logits.scatter_(1, self.text_ids[after][:, None], 30.0)
        self.seconds += time.perf_counter() - start
        return logits


def build_engine(root: Path, tokenizer: Tokenizer, forward: StubForward, batch: int) -> Engine:
    vocab = forward.base.numel()
    cfg = ModelConfig(
        name="stub",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=MAX_CONTEXT,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.token_to_id("<s>"),
        eos_token_ids=(tokenizer.token_to_id("</s>"),),
    )
    adapters = AdapterCache(root, cfg, SINGLE, torch.float32, torch.device("cpu"), 2**30, 64)
    pages = batch * (MAX_CONTEXT // PAGE_SIZE)
    scheduler = Scheduler(PagePool(pages), PAGE_SIZE, batch, batch * MAX_CONTEXT, adapters)
    return Engine(
        scheduler, forward, tokenizer, cfg.eos_token_ids, MAX_CONTEXT, 10 * batch, ShardMetrics()
    )


def requests(
    batch: int, text_ids: list[int], new_tokens: int, temperature: float
) -> list[EngineRequest]:
    """Prompts of 64 to 511 tokens of the text, each continued by the stub's logits."""
    sampling = SamplingParams(temperature=temperature, top_p=0.95 if temperature else 1.0)
    return [
        EngineRequest(
            request_id=f"r{i}",
            adapter_id="",
            prompt_ids=tuple(text_ids[: 64 + (i * 149) % 448]),
            sampling=sampling,
            stopping=StopParams(max_new_tokens=new_tokens, stop=STOP),
            return_logprobs=True,
        )
        for i in range(batch)
    ]


class PhaseTimer:
    """Seconds spent in each wrapped callable, by phase name, in the current step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, phase: str, fn: Callable) -> Callable:
        self.seconds.setdefault(phase, 0.0)

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        """The current step's seconds by phase; the next step starts from zero."""
        taken, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return taken


@contextlib.contextmanager
def instrumented(engine: Engine, timer: PhaseTimer) -> Iterator[None]:
    """Times the step's phases; what is left of a step besides them and the forward is the
    per-sequence loop (`advance`). `detokenize` is the share of it spent in `TextStream`."""
    with contextlib.ExitStack() as stack:
        for name, phase in (("make_step", "plan"), ("sample", "sample")):
            fn = getattr(shard.engine.isolated_step, name)
            stack.enter_context(
                mock.patch.object(shard.engine.isolated_step, name, timer.wrap(phase, fn))
            )
        for name in ("push", "finish"):
            fn = getattr(TextStream, name)
            stack.enter_context(mock.patch.object(TextStream, name, timer.wrap("detokenize", fn)))
        stack.enter_context(
            mock.patch.object(
                engine.scheduler, "schedule", timer.wrap("schedule", engine.scheduler.schedule)
            )
        )
        stack.enter_context(
            mock.patch.object(engine, "_publish", timer.wrap("publish", engine._publish))
        )
        yield


def start(engine: Engine, reqs: list[EngineRequest], warmup: int) -> None:
    """Admits `reqs` and runs `warmup` steps: the prefill, then decode steps."""
    for req in reqs:
        engine.submit(req, discard)
    engine._take_inbox(block=False)
    for _ in range(warmup):
        engine._step()


def discard(out: StepOutput) -> None:
    if out.error is not None:
        raise out.error


def timed_steps(
    engine: Engine, forward: StubForward, batch: int, steps: int, timer: PhaseTimer | None = None
) -> list[dict[str, float]]:
    """Host seconds of each of `steps` decode steps of the whole batch (`host`), and by phase
    when `timer` is given: `advance` is what the other phases leave of the step."""
    out = []
    for _ in range(steps):
        forward.seconds = 0.0
        start = time.perf_counter()
        engine._step()
        row = {"host": time.perf_counter() - start - forward.seconds}
        if timer is not None:
            row |= timer.take()
            row["advance"] = row["host"] - sum(row[k] for k in PHASES if k != "advance")
        out.append(row)
    if len(engine.scheduler.running) != batch:
        raise RuntimeError(f"{len(engine.scheduler.running)} of {batch} requests still running")
    return out


@contextlib.contextmanager
def running(
    tokenizer: Tokenizer, text_ids: list[int], batch: int
) -> Iterator[tuple[Engine, StubForward]]:
    """An engine over a stub forward, for `batch` requests."""
    with tempfile.TemporaryDirectory() as tmp:
        forward = StubForward(torch.tensor(text_ids), tokenizer.get_vocab_size())
        engine = build_engine(Path(tmp), tokenizer, forward, batch)
        try:
            yield engine, forward
        finally:
            engine.scheduler.adapters.close()


def median_ms(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows) * 1e3


def measure(
    tokenizer: Tokenizer, text_ids: list[int], batch: int, a: argparse.Namespace
) -> dict[str, float]:
    """Median host ms per decode step: `total` (and `mean`) from a plain run, the phases from an
    instrumented one, whose wrappers add a little to each. Medians, because other processes on a
    small VM make some steps many times slower."""
    reqs = requests(batch, text_ids, a.warmup + a.steps + 1, a.temperature)
    with running(tokenizer, text_ids, batch) as (engine, forward):
        start(engine, reqs, a.warmup)
        plain = timed_steps(engine, forward, batch, a.steps)
    timer = PhaseTimer()
    with running(tokenizer, text_ids, batch) as (engine, forward), instrumented(engine, timer):
        start(engine, reqs, a.warmup)
        timer.take()
        phased = timed_steps(engine, forward, batch, a.steps, timer)
    mean = statistics.fmean(r["host"] for r in plain) * 1e3
    return {"total": median_ms(plain, "host"), "mean": mean} | {
        k: median_ms(phased, k) for k in (*PHASES, "detokenize")
    }


def profile(tokenizer: Tokenizer, text_ids: list[int], batch: int, a: argparse.Namespace) -> None:
    """Prints the functions that take the most of a batch's steps (cProfile, by own time)."""
    reqs = requests(batch, text_ids, a.warmup + a.steps + 1, a.temperature)
    with running(tokenizer, text_ids, batch) as (engine, forward):
        start(engine, reqs, a.warmup)
        with cProfile.Profile() as prof:
            timed_steps(engine, forward, batch, a.steps)
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def measure_mixed_cases(cases: list[tuple[int, int]], a: argparse.Namespace) -> list[dict]:
    """Median ms of the decode-only and the mixed step for each (batch, prefill tokens) case,
    on the tiny model with `a.mixed_layers` layers, with its adapters dealt over the batch beside
    the base model, and with the base model alone (whose narrow layers leave the step's time to
    the host: the CPU reference of SGMV computes, where a GPU launches one kernel)."""
    from shard.compose import build_engine as build_shard_engine
    from shard.config import parse_config
    from shard.tiny import TinySpec, write_tiny

    longest = max(n for _, n in cases)
    spec = TinySpec(num_layers=a.mixed_layers, max_position_embeddings=4 * longest + 1024)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny(Path(tmp), spec=spec)
        known = {"adapters": [*tiny.adapter_ids, ""], "base": [""]}
        mixes = {name: known[name] for name in a.mixed_rows.split(",")}
        for (batch, tokens), (mix, adapters) in itertools.product(cases, mixes.items()):
            argv = ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir)]
            argv += ["--device", "cpu", "--kv-pages", str(64 * (batch + 4) + 4 * longest)]
            argv += ["--max-batch-size", str(batch + 1), "--max-prefill-tokens", str(longest)]
            engine, _, _ = build_shard_engine(parse_config(argv, env={}), SINGLE)
            try:
                vocab = engine.tokenizer.get_vocab_size()
                start_decodes(engine, batch, adapters, vocab, 64, 4 * a.mixed_reps + 8)
                timing = measure_mixed(engine, batch, tokens, a.mixed_reps, vocab)
            finally:
                engine.scheduler.adapters.close()
            row = {"rows": mix} | {f: getattr(timing, f) for f in timing.__slots__}
            out.append(row)
            print(
                f"mixed {mix:8s} B={batch:3d} N={tokens:5d}: decode {timing.decode_ms:7.2f} ms, "
                f"mixed {timing.mixed_ms:7.2f} ms (forward {timing.decode_forward_ms:6.2f} / "
                f"{timing.mixed_forward_ms:6.2f} ms; CPU {timing.decode_cpu_ms:7.2f} / "
                f"{timing.mixed_cpu_ms:7.2f} ms)",
                flush=True,
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=400, help="decode steps measured per batch")
    p.add_argument("--warmup", type=int, default=20, help="steps before measuring")
    p.add_argument("--vocab", type=int, default=4096, help="the BPE tokenizer's vocabulary")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--profile", type=int, default=0, help="also cProfile this batch size")
    p.add_argument("--mixed", default="", help="B:N,... decode batch B beside an N-token prefill")
    p.add_argument("--mixed-layers", type=int, default=32, help="layers of the mixed-step model")
    p.add_argument("--mixed-reps", type=int, default=20, help="steps timed per mixed case")
    p.add_argument(
        "--mixed-rows",
        default="adapters,base",
        help="decode rows of the mixed cases: adapters (the tiny ones and the base), base, or both",
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--commit", default=None, help="default: git rev-parse HEAD")
    p.add_argument("--command", default="python -m benchmarks.bench_engine_host")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    text = corpus()
    tokenizer = train_tokenizer(text, a.vocab)
    text_ids = tokenizer.encode(text, add_special_tokens=False).ids
    result: dict = {"benchmark": "engine_host"} | provenance(a.command, a.commit, None, "cpu")
    result |= {
        "vocab": tokenizer.get_vocab_size(),
        "steps": a.steps,
        "temperature": a.temperature,
        "stop_strings": list(STOP),
        "host_ms_per_step": {},
    }
    print(f"{'batch':>5} {'total':>7} {'mean':>7} " + " ".join(f"{k:>9}" for k in PHASES), end="")
    print(" detokenize  (median host ms per step)")
    for batch in (int(b) for b in a.batches.split(",") if b):
        row = measure(tokenizer, text_ids, batch, a)
        result["host_ms_per_step"][str(batch)] = row
        cells = " ".join(f"{row[k]:9.3f}" for k in PHASES)
        print(
            f"{batch:5d} {row['total']:7.3f} {row['mean']:7.3f} {cells} {row['detokenize']:10.3f}",
            flush=True,
        )
    if a.mixed:
        cases = [tuple(int(v) for v in c.split(":")) for c in a.mixed.split(",")]
        result |= {"mixed_layers": a.mixed_layers, "mixed_reps": a.mixed_reps}
        result["mixed_ms_per_step"] = measure_mixed_cases(cases, a)  # type: ignore[arg-type]
    if a.profile:
        profile(tokenizer, text_ids, a.profile, a)
    if a.out is not None:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
