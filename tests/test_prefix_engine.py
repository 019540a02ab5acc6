"""The prefix cache in the engine, against transformers + PEFT: requests that share a system
prompt prefill only what follows it, with greedy tokens equal to PEFT's with the cache on and off,
for full and partial hits, migrated requests (the destination holding the prefix or not),
requests after a hot reload (the old version's keys and values are never used), evictions and a
storm of cancellations.

The engine is driven step by step on the test's thread (its loop thread is never started), so
each test knows what every admission found in the cache."""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shard.compose import build_engine
from shard.config import parse_config
from shard.engine.engine import Engine
from shard.engine.sequence import Resume, Sequence
from shard.parallel.group import SINGLE
from tests.reference import greedy
from tests.test_engine import Collector, request, until

NEW = 8
LOOKUPS = "lorafleet_shard_prefix_lookups_total"
SYSTEM = [(13 * i + 7) % 290 + 5 for i in range(18)]  # 4 full pages of 4 tokens, and 2 more
TAILS = ([201, 202, 203], [90, 91], [33, 34, 35, 36, 37])


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These tests drive many tiny forwards: torch's intra-op threads only contend for a
    loaded machine's cores there (tens of times slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def engine_of(tiny, cache: str, *extra: str, adapters: Path | None = None) -> Engine:
    argv = ["--model", str(tiny.model_dir), "--adapters", str(adapters or tiny.adapters_dir)]
    argv += ["--device", "cpu", "--page-size", "4", "--prefix-cache", cache, *extra]
    engine, _, _ = build_engine(parse_config(argv, env={}), SINGLE)
    return engine


@functools.cache
def _greedy(model: Path, adapter: Path | None, prompt: tuple[int, ...], new: int) -> list[int]:
    return greedy(model, adapter, list(prompt), new)[0]


def expected(
    tiny, adapter: str, prompt: list[int], new: int = NEW, folder: Path | None = None
) -> list[int]:
    """PEFT's greedy tokens (of the adapter's files in `folder`, when given)."""
    adapter_dir = folder or (tiny.adapter_dir(adapter) if adapter else None)
    return _greedy(tiny.model_dir, adapter_dir, tuple(prompt), new)


def submit(
    engine: Engine, rid: str, adapter: str, prompt: list[int], resume: Resume | None = None
) -> Collector:
    """Submits one request for NEW tokens more than `resume` carries."""
    sink = Collector()
    new = NEW + (len(resume.generated_ids) if resume else 0)
    engine.submit(dataclasses.replace(request(rid, adapter, prompt, new), resume=resume), sink)
    engine._take_inbox(block=False)
    return sink


def run(
    engine: Engine, rid: str, adapter: str, prompt: list[int], resume: Resume | None = None
) -> tuple[Collector, int]:
    """Runs one request to its end: its sink, and the tokens its admission found cached."""
    sink = submit(engine, rid, adapter, prompt, resume)
    seq = seq_of(engine, rid)
    until(engine, sink.done.is_set)
    return sink, seq.prefix_hit


def seq_of(engine: Engine, rid: str) -> Sequence:
    sched = engine.scheduler
    return next(s for s in [*sched.running, *sched.waiting] if s.req.request_id == rid)


def metric(engine: Engine, name: str, **labels: str) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def settled(engine: Engine) -> None:
    """Nothing runs: every page is free or kept by the cache and idle, none is held."""
    pool = engine.scheduler.pool
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert pool.free == pool.total
    assert all(pool.refs(p) == 0 for p in range(pool.total))
    assert pool.idle == pool.kept


@pytest.mark.parametrize("cache", ["on", "off"])
def test_shared_system_prompt_hits_and_partial_hits_match_peft(tiny, cache: str) -> None:
    """Three adapters and the base model each see the system prompt several times: the first
    request of each prefills it, later ones find its full blocks (all of them, or only the
    first when the prompt diverges early), never another adapter's; tokens equal PEFT's."""
    engine = engine_of(tiny, cache)
    on = cache == "on"
    primers = [(a, [*SYSTEM, *TAILS[0]], 0) for a in ("r8-all", "r16-attn", "", "r4-qv")]
    rows = [(a, [*SYSTEM, *tail], 16 if on else 0) for a, _, _ in primers for tail in TAILS[1:]]
    rows.append(("r8-all", [*SYSTEM[:6], 1, 2, 3], 4 if on else 0))  # diverges in block 2
    rows.append(("r8-all", SYSTEM[:16], 12 if on else 0))  # all cached: the last block is not
    try:
        sinks, seqs = [], []
        for group in (primers[:1], primers[1:]):  # the same prompt, later on other adapters
            for a, p, _ in group:
                sinks.append(submit(engine, f"a{len(seqs)}", a, p))
                seqs.append(seq_of(engine, f"a{len(seqs)}"))
            until(engine, lambda: all(s.first_token is not None for s in seqs))  # computed
        sinks += [submit(engine, f"b{i}", a, p) for i, (a, p, _) in enumerate(rows)]
        seqs += [seq_of(engine, f"b{i}") for i in range(len(rows))]
        until(engine, lambda: all(s.done.is_set() for s in sinks))
        settled(engine)
    finally:
        engine.scheduler.adapters.close()
    rows = primers + rows
    results = list(zip(sinks, (s.prefix_hit for s in seqs), strict=True))
    assert [hit for _, hit in results] == [hit for _, _, hit in rows]
    for (adapter, prompt, _), (sink, hit) in zip(rows, results, strict=True):
        assert sink.tokens == expected(tiny, adapter, prompt), (adapter or "base", prompt)
        assert sink.outputs[-1].usage.prompt_tokens == len(prompt)
        assert sink.outputs[-1].usage.cached_prompt_tokens == hit
    hit_tokens = metric(engine, "lorafleet_shard_prefix_hit_tokens_total", adapter="r8-all")
    assert hit_tokens == (2 * 16 + 4 + 12 if on else 0)
    if on:
        assert (
            metric(engine, "lorafleet_shard_prefix_lookups_total", adapter="<base>", result="hit")
            == 2
        )
        assert engine.scheduler.pool.kept > 4 * 4  # every adapter's prefix, its own pages


def test_migrated_request_resumes_exactly_whether_or_not_the_destination_holds_its_prefix(
    tiny,
) -> None:
    """A request resumed with tokens generated elsewhere re-prefills prompt + generated tokens:
    on a shard that has seen the prompt it skips the cached blocks, on one that has not it
    prefills all; both continue with PEFT's tokens, and a resumed request's own blocks (prompt
    and generated tokens) serve a later resume."""
    prompt = [*SYSTEM, *TAILS[0]]
    want = expected(tiny, "r32-mlp", prompt, 2 * NEW)
    warm = engine_of(tiny, "on")
    cold = engine_of(tiny, "on")
    try:
        first, _ = run(warm, "w", "r32-mlp", prompt)
        assert first.tokens == want[:NEW]
        resume = Resume(tuple(want[:NEW]))
        on_warm, warm_hit = run(warm, "m1", "r32-mlp", prompt, resume)
        on_cold, cold_hit = run(cold, "m2", "r32-mlp", prompt, resume)
        again, again_hit = run(cold, "m3", "r32-mlp", prompt, resume)
        settled(warm)
        settled(cold)
    finally:
        warm.scheduler.adapters.close()
        cold.scheduler.adapters.close()
    assert warm_hit == 20 and cold_hit == 0  # prompt blocks (21 tokens), then generated ones
    assert again_hit == 28  # 21 + 8 tokens re-prefilled on the cold shard: 7 blocks, the last
    assert on_warm.tokens == on_cold.tokens == again.tokens == want[NEW:]
    for sink in (on_warm, on_cold, again):
        assert sink.outputs[-1].usage.generated_tokens == 2 * NEW
    # Cached prompt tokens only: the cold shard's second resume found generated tokens too.
    cached = [s.outputs[-1].usage.cached_prompt_tokens for s in (on_warm, on_cold, again)]
    assert cached == [20, 0, 21]


def test_hits_on_the_chunks_of_a_prefill_still_running_then_chunked_rest(tiny) -> None:
    """With an 8-token step budget: a request arriving while another with the same prompt is
    in its chunked prefill finds the blocks that the finished chunks computed, a later one
    finds the whole prefix, and each prefills the rest in chunks; tokens equal PEFT's."""
    engine = engine_of(tiny, "on", "--max-prefill-tokens", "8")
    prompt, longer = [*SYSTEM, *TAILS[0]], [*SYSTEM, *TAILS[2], 40, 41, 42, 43]
    try:
        first = submit(engine, "c0", "r16-attn", prompt)
        head = seq_of(engine, "c0")
        until(engine, lambda: head.num_cached >= 16)  # two chunks of 8: blocks 0-3 computed
        assert head.first_token is None
        second = submit(engine, "c1", "r16-attn", prompt)
        follower = seq_of(engine, "c1")
        until(engine, lambda: follower.first_scheduled is not None)
        # Admitted beside the head's last chunk (5 tokens), with the 3 left of the budget: the
        # head's fifth block was not computed yet (once it is, a hit is 20 tokens).
        assert follower.prefix_hit == 16
        until(engine, lambda: first.done.is_set() and second.done.is_set())
        third = submit(engine, "c2", "r16-attn", longer)
        last = seq_of(engine, "c2")
        chunked = 0
        while not third.done.is_set():
            engine._step()
            chunked += 16 < last.num_cached < len(longer)
        settled(engine)
    finally:
        engine.scheduler.adapters.close()
    assert last.prefix_hit == 16 and chunked == 1  # 11 tokens left: 8, then 3
    assert first.tokens == second.tokens == expected(tiny, "r16-attn", prompt)
    assert third.tokens == expected(tiny, "r16-attn", longer)


def _replace_files(src: Path, dst: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        tmp = dst / f".{name}.new"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)


def test_after_a_hot_reload_the_old_versions_cached_kv_is_never_used(tiny, tmp_path) -> None:
    """An adapter's files are replaced between two requests with the same prompt: the second
    runs on the new weights with none of the old version's blocks (they are retired and their
    pages freed), and its tokens equal PEFT's on the new files; reloading the old files again
    (the same version) finds nothing stale either."""
    root = tmp_path / "adapters"
    root.mkdir()
    old_src, new_src = tiny.adapter_dir("r8-all"), tiny.adapter_dir("r64-all-rslora")
    shutil.copytree(old_src, root / "hot")
    engine = engine_of(tiny, "on", adapters=root)
    prompt = [*SYSTEM, *TAILS[1]]
    cache = engine.scheduler.prefix
    assert cache is not None
    try:
        engine.scheduler.adapters.lookup("hot")  # what the server does for every request
        before, _ = run(engine, "old", "hot", prompt)
        again, again_hit = run(engine, "old2", "hot", prompt)
        assert again_hit == 16 and cache.blocks == 5
        _replace_files(new_src, root / "hot")
        engine.scheduler.adapters.lookup("hot")
        after, after_hit = run(engine, "new", "hot", prompt)
        retired = metric(engine, "lorafleet_shard_prefix_retired_pages_total")
        time.sleep(0.01)  # a new mtime even on coarse clocks
        _replace_files(old_src, root / "hot")
        engine.scheduler.adapters.lookup("hot")
        back, back_hit = run(engine, "back", "hot", prompt)
        settled(engine)
    finally:
        engine.scheduler.adapters.close()
    assert after_hit == 0 and retired == 5  # the old version's 5 blocks
    assert back_hit == 0  # the new version's blocks were retired in turn, none were reused
    assert before.tokens == again.tokens == back.tokens == expected(tiny, "r8-all", prompt)
    assert after.tokens == expected(tiny, "", prompt, folder=new_src) != before.tokens


@pytest.mark.parametrize("budget", [512, 5])
def test_evictions_and_a_cancellation_storm_leave_every_page_free_or_cached(
    tiny, budget: int
) -> None:
    """Many requests over shared prefixes in a small pool (running requests, some partly
    prefilled, are evicted and recomputed, idle cached pages are reclaimed), a third of them
    cancelled at random steps: the others' tokens equal PEFT's, and at the end no page is held
    by anyone."""
    rng = random.Random(7)
    flags = ("--kv-pages", "24", "--max-batch-size", "6", "--max-prefill-tokens", str(budget))
    engine = engine_of(tiny, "on", *flags)
    adapters = ("r8-all", "", "r16-attn")
    rows = [
        (adapters[i % 3], [*SYSTEM[: rng.choice((8, 12, 18))], *rng.choice(TAILS)])
        for i in range(18)
    ]
    cancelled = set(rng.sample(range(len(rows)), 6))
    cache = engine.scheduler.prefix
    assert cache is not None
    sinks = [Collector() for _ in rows]
    try:
        for i, ((adapter, prompt), sink) in enumerate(zip(rows, sinks, strict=True)):
            engine.submit(request(f"s{i}", adapter, prompt, new=NEW), sink)
        pending = sorted(cancelled)
        steps = 0
        while not all(s.done.is_set() for i, s in enumerate(sinks) if i not in cancelled):
            engine._take_inbox(block=False)
            if pending and rng.random() < 0.3:
                engine.cancel(f"s{pending.pop()}")
            engine._step()
            steps += 1
            assert steps < 3000
            pool = engine.scheduler.pool
            assert all(pool.refs(p) >= 0 for p in range(pool.total))
            for seq in engine.scheduler.running:  # its cached pages are its version's blocks
                for page in seq.pages[: seq.prefix_hit // 4]:
                    assert cache.index.block_of[page][0] == seq.adapter_key
        for i in pending:
            engine.cancel(f"s{i}")
        engine._take_inbox(block=False)
        settled(engine)
    finally:
        engine.scheduler.adapters.close()
    assert metric(engine, "lorafleet_shard_prefix_evicted_pages_total") > 0
    assert (
        sum(
            metric(engine, "lorafleet_shard_prefix_hit_tokens_total", adapter=a or "<base>")
            for a in adapters
        )
        > 0
    )
    for i, ((adapter, prompt), sink) in enumerate(zip(rows, sinks, strict=True)):
        if i not in cancelled or sink.done.is_set():
            assert sink.tokens == expected(tiny, adapter, prompt), i
