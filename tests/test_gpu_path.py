"""The GPU path (SGMV and paged-attention kernels, decode steps replayed from CUDA graphs) against
the CPU reference path, on a tiny model whose head_dim (64) the attention kernel serves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard.compose import build_engine
from shard.config import parse_config
from shard.parallel.group import SINGLE
from shard.tiny import TinySpec, write_tiny
from tests.test_engine import mixed_rows, submit_all

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NEW_TOKENS = 24
GPU_SPEC = TinySpec(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512)


@pytest.fixture(scope="module")
def gpu_tiny(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny(Path(tmp_path_factory.mktemp("gpu-tiny")), spec=GPU_SPEC)


def generate(tiny, *flags: str) -> tuple[list[list[int]], list[list[float]], object]:
    """Greedy tokens and logprobs of the mixed batch (5 adapters, 2 base rows) in one engine."""
    argv = ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir)]
    argv += ["--kv-pages", "256", *flags]
    engine, _, leader = build_engine(parse_config(argv, env={}), SINGLE)
    engine.start()
    rows = mixed_rows(tiny)
    try:
        sinks = submit_all(engine, rows, "g", new=NEW_TOKENS)
        assert all(sink.outputs[-1].error is None for sink in sinks)
    finally:
        engine.stop()
    return [s.tokens for s in sinks], [s.logprobs for s in sinks], leader.state.runner


def test_graph_replay_equals_eager(gpu_tiny) -> None:
    graph_tokens, graph_lp, runner = generate(gpu_tiny, "--device", "cuda", "--dtype", "float16")
    captured = [s for s in runner.decode_graphs._shapes.values() if s.graph is not None]
    assert captured, "no decode step ran from a CUDA graph"
    eager_tokens, eager_lp, _ = generate(
        gpu_tiny, "--device", "cuda", "--dtype", "float16", "--cuda-graphs", "off"
    )
    assert graph_tokens == eager_tokens
    for g, e in zip(graph_lp, eager_lp, strict=True):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(e), atol=2e-2, rtol=0)


def assert_greedy_close(
    tokens: list[list[int]], logprobs: list[list[float]], ref_tokens, ref_logprobs, atol: float
) -> None:
    """Greedy tokens agree until a near-tie (two tokens within rounding noise of each other)
    may flip one; at such a flip both runs pick a token of the same logprob, and logprobs agree
    everywhere before it. Most tokens must come before any flip."""
    matched = 0
    for toks, ref_toks, lps, ref_lps in zip(
        tokens, ref_tokens, logprobs, ref_logprobs, strict=True
    ):
        pairs = enumerate(zip(toks, ref_toks, strict=True))
        same = next((i for i, (t, r) in pairs if t != r), len(ref_toks))
        matched += same
        torch.testing.assert_close(
            torch.tensor(lps[:same]), torch.tensor(ref_lps[:same]), atol=atol, rtol=0
        )
        if same < len(ref_toks):
            assert abs(lps[same] - ref_lps[same]) < atol, (same, lps[same], ref_lps[same])
    assert matched >= 0.75 * sum(len(t) for t in ref_tokens), matched


def test_gpu_greedy_equals_cpu_reference(gpu_tiny) -> None:
    """fp16 on the GPU against float32 on the CPU. Logprob tolerance 0.1: the tiny model's
    logits have a standard deviation near 3, and fp16 carries about 3 significant digits."""
    gpu_tokens, gpu_lp, _ = generate(gpu_tiny, "--device", "cuda", "--dtype", "float16")
    cpu_tokens, cpu_lp, _ = generate(gpu_tiny, "--device", "cpu", "--dtype", "float32")
    assert_greedy_close(gpu_tokens, gpu_lp, cpu_tokens, cpu_lp, atol=0.1)


def test_compiled_elementwise_chains_equal_eager(gpu_tiny) -> None:
    """Fused chains round differently (no fp16 rounding between the ops they fuse)."""
    flags = ("--device", "cuda", "--dtype", "float16")
    fused, fused_lp, _ = generate(gpu_tiny, *flags, "--compile", "on")
    plain, plain_lp, _ = generate(gpu_tiny, *flags, "--compile", "off")
    assert_greedy_close(fused, fused_lp, plain, plain_lp, atol=0.1)


def test_gpu_greedy_with_chunked_prefill_equals_cpu_reference(gpu_tiny) -> None:
    """Every prompt prefilled in chunks of 3 tokens on the GPU, beside decode rows (the masked
    attention over gathered pages, the LoRA of partial chunks), against the CPU reference with
    whole prompts."""
    flags = ("--device", "cuda", "--dtype", "float16", "--max-prefill-tokens", "3")
    gpu_tokens, gpu_lp, _ = generate(gpu_tiny, *flags)
    cpu_tokens, cpu_lp, _ = generate(gpu_tiny, "--device", "cpu", "--dtype", "float32")
    assert_greedy_close(gpu_tokens, gpu_lp, cpu_tokens, cpu_lp, atol=0.1)
