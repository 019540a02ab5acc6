"""Decode graphs captured at start (--graph-warmup): the flag, the shapes the start-up path
builds, the graph memory the KV plan reserves, and that warmed shapes serve without a capture
(on CPU the padded shapes run eagerly; on a GPU they replay from the graphs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard import compose
from shard.compose import build_engine
from shard.config import ShardConfig, parse_config
from shard.engine.decode_graphs import DecodeGraphs
from shard.engine.engine import Engine
from shard.engine.graph_shapes import GraphKey, width_classes
from shard.engine.memory_plan import GRAPH_OVERHEAD_BYTES, decode_graph_bytes
from shard.engine.model_runner import ModelRunner
from shard.metrics import ShardMetrics
from shard.model.config import load_model_config
from shard.parallel.group import SINGLE
from shard.tiny import write_tiny
from tests.test_engine import PROMPTS, Collector, reference, submit_all
from tests.test_gpu_path import GPU_SPEC

BASE_AND_SMALL_RANKS = ("", "r4-qv", "r8-all", "r16-attn", "")  # rank classes 0 and 16
LAZY_ROW = ("r64-all-rslora", PROMPTS[0])
GPU_FLAGS = ("--device", "cuda", "--dtype", "float16", "--kv-pages", "256", "--max-batch-size", "8")


def config(tiny, *extra: str, env: dict[str, str] | None = None) -> ShardConfig:
    argv = ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir), *extra]
    return parse_config(argv, env=env or {})


def warm_rows() -> list[tuple[str, list[int]]]:
    return [(a, PROMPTS[i]) for i, a in enumerate(BASE_AND_SMALL_RANKS)]


def keys(
    batches: tuple[int, ...], ranks: tuple[int, ...], widths: tuple[int, ...]
) -> set[GraphKey]:
    return {GraphKey(b, r, w) for b in batches for r in ranks for w in widths}


def test_flag_default_off_env_and_order(tiny) -> None:
    assert config(tiny).graph_warmup == (0, 16)
    assert config(tiny, "--graph-warmup", "off").graph_warmup == ()
    assert config(tiny, env={"LORAFLEET_GRAPH_WARMUP": "off"}).graph_warmup == ()
    assert config(tiny, "--graph-warmup", "64, 0,16,64").graph_warmup == (0, 16, 64)


@pytest.mark.parametrize("value", ["8", "0,17", "", "sixteen", "on"])
def test_flag_rejects_what_is_not_a_rank_class(tiny, value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        config(tiny, "--graph-warmup", value)
    assert "--graph-warmup must be off or a comma list of LoRA rank classes" in (
        capsys.readouterr().err
    )


def cpu_graphs(*args: object, use_graphs: bool, metrics: ShardMetrics | None) -> DecodeGraphs:
    """Stands in for DecodeGraphs in shard.compose: what it builds for a CUDA device, built on
    the CPU (padded shapes of the warm-up, no graphs)."""
    *rest, device = args
    assert isinstance(device, torch.device) and device.type == "cuda" and use_graphs
    return DecodeGraphs(*rest, torch.device("cpu"), use_graphs=use_graphs, metrics=metrics)


def startup_graphs(tiny, monkeypatch, *flags: str) -> tuple[Engine, ModelRunner, DecodeGraphs]:
    """A CPU engine whose runner holds the decode graphs that compose.build_decode_graphs makes for
    a CUDA rank with these flags."""
    cfg = config(tiny, "--device", "cpu", "--page-size", "4", "--max-batch-size", "8", *flags)
    engine, _, leader = build_engine(cfg, SINGLE)
    state = leader.state
    monkeypatch.setattr(compose, "DecodeGraphs", cpu_graphs)
    max_context = state.model_cfg.max_position_embeddings
    graphs = compose.build_decode_graphs(
        cfg, state.runner.model, state.kv, torch.device("cuda", 0), max_context
    )
    assert graphs is not None
    state.runner.decode_graphs = graphs
    return engine, state.runner, graphs


def test_startup_builds_every_bucket_and_width_of_the_configured_classes(tiny, monkeypatch) -> None:
    # max context 256 tokens = 64 pages of 4 -> widths 8..64; max batch 8 -> buckets 1..8
    _, _, graphs = startup_graphs(tiny, monkeypatch, "--graph-warmup", "0,32")
    assert set(graphs._shapes) == keys((1, 2, 4, 8), (0, 32), (8, 16, 32, 64))
    assert graphs.captured == 0  # CPU: padded shapes, no graphs


def test_startup_widths_stop_at_the_kv_pool(tiny, monkeypatch) -> None:
    """A request never holds more pages than the pool: 20 pages -> widths up to 32."""
    _, _, graphs = startup_graphs(tiny, monkeypatch, "--kv-pages", "20")
    assert set(graphs._shapes) == keys((1, 2, 4, 8), (0, 16), (8, 16, 32))


def test_startup_warmup_off_and_graphs_off(tiny, monkeypatch) -> None:
    _, _, graphs = startup_graphs(tiny, monkeypatch, "--graph-warmup", "off")
    assert not graphs._shapes
    cfg = config(tiny, "--device", "cpu", "--cuda-graphs", "off")
    _, _, leader = build_engine(cfg, SINGLE)
    state = leader.state
    cuda = torch.device("cuda", 0)
    assert compose.build_decode_graphs(cfg, state.runner.model, state.kv, cuda, 256) is None
    assert state.runner.decode_graphs is None  # a CPU rank decodes eagerly, unpadded


def test_warmed_shapes_serve_without_new_ones_and_others_build_lazily(tiny, monkeypatch) -> None:
    engine, _, graphs = startup_graphs(tiny, monkeypatch)
    warmed = dict(graphs._shapes)
    engine.start()
    try:
        sinks = submit_all(engine, warm_rows(), "w")
        assert graphs._shapes == warmed, set(graphs._shapes) - set(warmed)
        for (adapter, prompt), sink in zip(warm_rows(), sinks, strict=True):
            assert sink.tokens == reference(tiny, adapter, prompt)[0], adapter or "base"
        submit_all(engine, [LAZY_ROW], "lazy")
    finally:
        engine.stop()
    # One request alone decodes at batch 1 in rank class 64, which was not warmed.
    new = set(graphs._shapes) - set(warmed)
    assert new and {(key.batch, key.rank) for key in new} == {(1, 64)}, new


def test_graph_memory_reserved_for_the_warmup(tiny) -> None:
    model_cfg = load_model_config(tiny.model_dir)
    flags = ("--device", "cuda", "--max-batch-size", "8", "--page-size", "16")
    # 256 tokens = 16 pages -> widths 8, 16; buckets 1..8 sum to 15 rows; ranks 0 and 16
    assert width_classes(16) == (8, 16)
    kept = 15 * 2 * 2 * model_cfg.vocab_size * 4
    transient = 8 * model_cfg.vocab_size * (2 + 4)  # bfloat16 logits and their float32 copy
    tables = 15 * 2 * (8 + 16) * 4  # int32 page tables [batch, width]
    want = kept + transient + tables + 16 * GRAPH_OVERHEAD_BYTES  # 4 buckets x 2 ranks x 2 widths

    def reserved(*extra: str, dtype: torch.dtype = torch.bfloat16) -> int:
        return decode_graph_bytes(compose.memory_flags(config(tiny, *extra)), model_cfg, dtype)

    assert reserved(*flags) == want
    for off in (("--graph-warmup", "off"), ("--cuda-graphs", "off"), ("--kv-pages", "64")):
        assert reserved(*flags, *off) == 0
    assert reserved("--device", "cpu", dtype=torch.float32) == 0


@pytest.fixture(scope="module")
def gpu_tiny(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny(Path(tmp_path_factory.mktemp("gpu-tiny-warmup")), spec=GPU_SPEC)


def gpu_engine(tiny, *flags: str) -> tuple[Engine, ModelRunner]:
    engine, _, leader = build_engine(config(tiny, *GPU_FLAGS, *flags), SINGLE)
    return engine, leader.state.runner


def gpu_decode(engine: Engine, rows: list[tuple[str, list[int]]], prefix: str) -> list[Collector]:
    sinks = submit_all(engine, rows, prefix, new=24)
    assert all(sink.outputs[-1].error is None for sink in sinks)
    return sinks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_warmed_graphs_replay_without_capture_and_equal_eager(gpu_tiny) -> None:
    """Default warm-up (rank classes 0 and 16) of a pool of 256 pages of 16 tokens and max batch
    8: buckets 1..8 x widths 8, 16, captured before the engine starts."""
    engine, runner = gpu_engine(gpu_tiny)
    graphs = runner.decode_graphs
    assert graphs is not None
    expected = keys((1, 2, 4, 8), (0, 16), (8, 16))
    assert set(graphs._shapes) == expected and graphs.captured == len(expected)
    # Measured on an H200: 4.25 MiB a graph run alone (less after other tests), where a fresh
    # warm-up stream per capture (a cuBLAS workspace kept per stream) took about 18 MiB.
    assert graphs.warm_up_bytes < 8 * 2**20 * len(expected), graphs.warm_up_bytes
    captured = {key: shape.graph for key, shape in graphs._shapes.items()}
    engine.start()
    try:
        sinks = gpu_decode(engine, warm_rows(), "w")
        assert graphs.captured == len(expected)  # every decode step replayed a warmed graph
        assert {key: shape.graph for key, shape in graphs._shapes.items()} == captured
        gpu_decode(engine, [LAZY_ROW], "lazy")
    finally:
        engine.stop()
    assert graphs.captured == len(expected) + 1  # rank class 64: captured on first use
    exported = engine.metrics.registry.get_sample_value("lorafleet_shard_decode_graphs")
    assert exported == len(expected) + 1
    assert graphs._shapes[GraphKey(1, 64, 8)].graph is not None
    eager_engine, eager_runner = gpu_engine(gpu_tiny, "--cuda-graphs", "off")
    assert eager_runner.decode_graphs is None
    eager_engine.start()
    try:
        eager = gpu_decode(eager_engine, warm_rows(), "e")
    finally:
        eager_engine.stop()
    assert [s.tokens for s in sinks] == [s.tokens for s in eager]
    for graph_sink, eager_sink in zip(sinks, eager, strict=True):
        torch.testing.assert_close(
            torch.tensor(graph_sink.logprobs), torch.tensor(eager_sink.logprobs), atol=2e-2, rtol=0
        )
