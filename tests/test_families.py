"""Qwen2, Mistral and Llama 3 checkpoints written by transformers, loaded through the shard's real
loading code, against transformers + PEFT: greedy tokens and logprobs of a mixed batch (five
adapters over every target subset, plus the base model) equal each request run alone."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from protos import generate_pb2
from shard.edge.request_validation import RequestError, to_engine_request
from shard.engine.sequence import FinishReason, StopParams
from shard.model.config import ModelConfigError, load_model_config
from shard.model.layers.rotary import inverse_frequencies
from shard.model.loader import build_model, load_tokenizer
from shard.parallel.group import SINGLE
from tests.families import FAMILY_SPECS
from tests.reference import greedy
from tests.test_engine import (
    PROMPTS,
    Collector,
    make_engine,
    mixed_rows,
    request,
    submit_all,
)

transformers = pytest.importorskip("transformers")


NEW = 16


@pytest.mark.parametrize("family", list(FAMILY_SPECS))
def test_mixed_batch_matches_peft(tiny_family, family: str) -> None:
    tiny = tiny_family(family)
    rows = mixed_rows(tiny)
    engine = make_engine(tiny)
    try:
        sinks = submit_all(engine, rows, family, new=NEW)
    finally:
        engine.stop()
    for (adapter, prompt), sink in zip(rows, sinks, strict=True):
        tokens, logits = greedy(
            tiny.model_dir, tiny.adapter_dir(adapter) if adapter else None, prompt, NEW
        )
        assert sink.tokens == tokens, f"{family} adapter {adapter or 'base'}"
        want = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(sink.logprobs), want, atol=1e-4, rtol=1e-4)


def _hf(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_qwen2_biases_are_loaded_and_change_tokens(tiny_family) -> None:
    tiny = tiny_family("qwen2-untied")
    cfg = load_model_config(tiny.model_dir)
    assert (cfg.architecture, cfg.qkv_bias, cfg.tie_word_embeddings) == (
        "Qwen2ForCausalLM",
        True,
        False,
    )
    hf = _hf(tiny.model_dir)
    shard = build_model(cfg, tiny.model_dir, SINGLE, torch.float32, torch.device("cpu"))
    attn = hf.model.layers[1].self_attn
    want = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    torch.testing.assert_close(shard.layers[1].self_attn.qkv_proj.bias, want, rtol=0, atol=0)
    # Without its biases the model answers differently, so the token test above covers them.
    prompt = PROMPTS[0]
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
        unbiased = hf.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=-1
        )[0, len(prompt) :].tolist()
    assert unbiased != greedy(tiny.model_dir, None, prompt, 8)[0]


def test_a_bias_the_architecture_lacks_is_refused(tiny_family, tmp_path: Path) -> None:
    """A Qwen2 checkpoint relabelled as Llama: its biases must not be dropped silently."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_family("qwen2-tied").model_dir, folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    llama = transformers.LlamaConfig(**{**config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    llama.save_pretrained(folder)
    cfg = load_model_config(folder)
    assert cfg.architecture == "LlamaForCausalLM" and not cfg.qkv_bias
    with pytest.raises(ModelConfigError, match=r"[qkv]_proj\.bias: LlamaForCausalLM has no bias"):
        build_model(cfg, folder, SINGLE, torch.float32, torch.device("cpu"))


def test_mistral_context_stops_at_its_sliding_window(tiny_family) -> None:
    tiny = tiny_family("mistral")
    cfg = load_model_config(tiny.model_dir)
    assert (cfg.architecture, cfg.sliding_window) == ("MistralForCausalLM", 48)
    assert cfg.max_position_embeddings == 256 and cfg.max_context == 48
    tokenizer = load_tokenizer(tiny.model_dir)
    msg = generate_pb2.GenerateRequest(
        prompt_token_ids=generate_pb2.TokenIds(ids=list(range(2, 42))),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=9),
    )
    with pytest.raises(
        RequestError,
        match=r"context of 48 tokens this shard serves \(the model's sliding window of 48",
    ) as err:
        to_engine_request(msg, "r", tokenizer, cfg, cfg.max_context, None, False)
    assert "at most 8" in str(err.value)
    msg.stopping.max_new_tokens = 8
    assert len(to_engine_request(msg, "r", tokenizer, cfg, cfg.max_context, None, False).prompt_ids)


def test_llama3_rope_frequencies_equal_transformers(tiny_family) -> None:
    tiny = tiny_family("llama3")
    cfg = load_model_config(tiny.model_dir)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    want = _hf(tiny.model_dir).model.rotary_emb.inv_freq
    got = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(got, want.float())
    plain = inverse_frequencies(cfg.head_dim, cfg.rope_theta, None)
    assert not torch.allclose(plain, want.float())  # the scaling really changes them


def test_llama3_stops_at_any_of_several_eos_ids(tiny_family, tmp_path: Path) -> None:
    """config.json lists two EOS ids; generation ends at the first one the model produces."""
    tiny = tiny_family("llama3")
    prompt = PROMPTS[2]
    tokens = greedy(tiny.model_dir, None, prompt, NEW)[0]
    at = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    folder = tmp_path / "model"
    shutil.copytree(tiny.model_dir, folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    eos = [config.eos_token_id, tokens[at]]
    config.eos_token_id = eos
    config.save_pretrained(folder)
    assert load_model_config(folder).eos_token_ids == tuple(eos)
    engine = make_engine(dataclasses.replace(tiny, model_dir=folder))
    try:
        sink = Collector()
        req = dataclasses.replace(
            request("eos", "", prompt), stopping=StopParams(max_new_tokens=NEW, ignore_eos=False)
        )
        engine.submit(req, sink)
        assert sink.done.wait(60)
    finally:
        engine.stop()
    assert sink.tokens == tokens[: at + 1]
    assert sink.outputs[-1].finish is FinishReason.EOS


def test_dummy_weights_give_zero_biases(tiny_family) -> None:
    """--load-format dummy on a Qwen2 shape: biases 0, norm scales 1, matrices random."""
    tiny = tiny_family("qwen2-tied")
    cfg = load_model_config(tiny.model_dir)
    model = build_model(cfg, tiny.model_dir, SINGLE, torch.float32, torch.device("cpu"), "dummy")
    layer = model.layers[0]
    assert layer.self_attn.qkv_proj.bias is not None
    assert not layer.self_attn.qkv_proj.bias.any()
    assert (layer.input_layernorm.weight == 1).all()
    assert layer.self_attn.qkv_proj.weight.std() > 0.01
