"""Decode steps through padded shapes (what CUDA graphs replay): the padding rows, scratch page,
padded LoRA segments and the one-copy staging buffer must not change a single token. On CPU the
padded path runs eagerly; tests/test_gpu_path.py replays it from graphs on a GPU."""

from __future__ import annotations

import torch

from shard.compose import build_engine
from shard.config import parse_config
from shard.engine.decode_graphs import DecodeGraphs, PaddedDecode, StagingArena
from shard.engine.engine import Engine
from shard.engine.graph_shapes import BATCH_BUCKETS, GraphKey, ceil_to, table_width
from shard.engine.kv_cache import pages_for
from shard.engine.step_plan import StepPlan
from shard.engine.tensor_tree import replace_leaves, tensor_leaves
from shard.model.layers.lora import LoraBatch, build_lora_batch
from shard.model.lora_weights import AdapterWeights
from shard.model.projections import LORA_MODULES
from shard.parallel.group import SINGLE
from tests.test_engine import mixed_rows, reference, submit_all


def padded_engine(tiny, *extra: str) -> tuple[Engine, DecodeGraphs]:
    argv = ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir)]
    argv += ["--device", "cpu", "--page-size", "4", *extra]
    engine, _, leader = build_engine(parse_config(argv, env={}), SINGLE)
    runner = leader.state.runner
    max_pages = pages_for(leader.state.model_cfg.max_position_embeddings, 4)
    graphs = DecodeGraphs(runner.model, runner.kv, 8, max_pages, runner.device, use_graphs=False)
    runner.decode_graphs = graphs
    engine.start()
    return engine, graphs


def test_classes() -> None:
    assert ceil_to(5, BATCH_BUCKETS) == 8
    assert ceil_to(8, BATCH_BUCKETS) == 8
    assert ceil_to(10**6, BATCH_BUCKETS) is None
    assert [table_width(p) for p in (1, 8, 9, 100)] == [8, 8, 16, 128]


def test_staging_arena_packs_and_uploads() -> None:
    arena = StagingArena(
        {"a": ((3,), torch.int64), "b": ((2, 5), torch.int32), "c": ((4,), torch.float32)},
        torch.device("cpu"),
    )
    arena.host["a"].copy_(torch.tensor([1, 2, 3]))
    arena.host["b"].copy_(torch.arange(10, dtype=torch.int32).view(2, 5))
    arena.host["c"].fill_(0.5)
    assert arena.device["a"].sum() == 0  # nothing reaches the device buffer before upload
    arena.upload()
    assert arena.device["a"].tolist() == [1, 2, 3]
    assert arena.device["b"].tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert arena.device["c"].tolist() == [0.5] * 4
    for view in arena.device.values():
        assert view.data_ptr() % StagingArena.ALIGN == 0


def test_lora_leaves_round_trip() -> None:
    batch = build_lora_batch(
        [0], [None], 4, torch.float32, torch.device("cpu"), num_segments=5, rank=16
    )
    leaves = tensor_leaves(batch)
    pointers = [name for name in leaves if name.endswith("a_ptrs")]
    assert pointers, "a padded LoraBatch holds every projection's pointer table"
    assert leaves["seg_starts"].tolist() == [0, 4, 4, 4, 4, 4]
    assert leaves["buffer"].shape[0] == 4
    swapped = {name: t.clone() + 1 for name, t in leaves.items() if t.dtype == torch.int32}
    rebuilt = replace_leaves(batch, swapped)
    assert isinstance(rebuilt, LoraBatch)
    assert rebuilt.seg_starts.tolist() == [1, 5, 5, 5, 5, 5]
    assert tensor_leaves(rebuilt)[pointers[0]] is leaves[pointers[0]]


def test_padded_decode_matches_peft(tiny) -> None:
    rows = mixed_rows(tiny)  # 7 rows: 5 adapters of ranks 4..64 and 2 base rows -> bucket 8
    engine, graphs = padded_engine(tiny)
    try:
        sinks = submit_all(engine, rows, "g")
    finally:
        engine.stop()
    used = set(graphs._shapes)
    assert GraphKey(8, 64, 8) in used or GraphKey(8, 64, 16) in used, used
    for (adapter, prompt), sink in zip(rows, sinks, strict=True):
        tokens, logits = reference(tiny, adapter, prompt)
        assert sink.tokens == tokens, f"adapter {adapter or 'base'}"
        want = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(sink.logprobs), want, atol=1e-4, rtol=1e-4)


def test_padded_decode_base_only_batch_matches_peft(tiny) -> None:
    rows = [("", p) for _, p in mixed_rows(tiny)[:3]]
    engine, graphs = padded_engine(tiny)
    try:
        sinks = submit_all(engine, rows, "b")
    finally:
        engine.stop()
    assert {key.rank for key in graphs._shapes} == {0}
    assert {key.batch for key in graphs._shapes} <= {1, 2, 4}
    for (adapter, prompt), sink in zip(rows, sinks, strict=True):
        assert sink.tokens == reference(tiny, adapter, prompt)[0]


def test_fill_reuses_lora_tables_only_for_the_same_residency() -> None:
    """Steps with the same segments on the same resident adapter versions keep the host tables;
    another adapter, or the same version copied to another address, rewrites them."""

    class Kv:  # the two fields PaddedDecode reads
        scratch_page, page_size = 0, 16

    def adapter(name: str) -> AdapterWeights:
        a = {m: torch.zeros(2, 8, 4) for m in LORA_MODULES}
        b = {m: torch.zeros(2, 8, 4) for m in LORA_MODULES}
        return AdapterWeights(name, "digest", "v1", 8, 2.0, a, b)

    plan = StepPlan(
        input_ids=(1, 2, 3),
        positions=(5, 5, 5),
        slots=(1, 2, 3),
        decode_pages=((1,), (2,), (3,)),
        decode_context=(6, 6, 6),
        prefills=(),
        logits_rows=(0, 1, 2),
        segments=((0, "x"), (1, "y")),
        adapters=("x", "y"),
    )
    shape = PaddedDecode(GraphKey(4, 16, 8), Kv(), torch.float32, torch.device("cpu"))
    x, y = adapter("x"), adapter("y")
    q = "lora.groups.q_proj+k_proj+v_proj.a_ptrs"
    shape.fill(plan, [x, y])
    first = shape.arena.host[q].clone()
    assert first[0, 0] == x.a["q_proj"].data_ptr() and first[0, 1] == y.a["q_proj"].data_ptr()
    shape.arena.host[q].zero_()  # a skipped rewrite leaves this visible
    shape.fill(plan, [x, y])
    assert shape.arena.host[q].count_nonzero() == 0
    for weights in ([y, x], [x, adapter("y")]):  # another adapter; the same version moved
        shape.fill(plan, weights)
        expect = [w.a["q_proj"].data_ptr() for w in weights]
        assert shape.arena.host[q][0, :2].tolist() == expect
