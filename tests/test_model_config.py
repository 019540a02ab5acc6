"""config.json of each family read as transformers writes it (4.x and 5.x key layouts), and
configurations the shard cannot serve refused with a message that says what it can serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shard.model.config import ModelConfigError, RopeScaling, load_model_config

BASE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def read(tmp_path: Path, **fields: object):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **fields}))
    return load_model_config(tmp_path)


@pytest.mark.parametrize(
    ("fields", "arch"),
    [
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "Qwen2ForCausalLM"),
        ({"model_type": "qwen2"}, "Qwen2ForCausalLM"),
        ({"model_type": "mistral"}, "MistralForCausalLM"),
        ({"architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
        ({}, "LlamaForCausalLM"),
    ],
)
def test_architecture_from_class_or_model_type(tmp_path: Path, fields: dict, arch: str) -> None:
    cfg = read(tmp_path, **fields)
    assert cfg.architecture == arch
    assert cfg.qkv_bias == (arch == "Qwen2ForCausalLM")


@pytest.mark.parametrize(
    "fields",
    [
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
        {"model_type": "qwen2_moe"},
        {"architectures": ["Gemma2ForCausalLM"]},
    ],
)
def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path, fields: dict) -> None:
    with pytest.raises(ModelConfigError, match="is not supported; the shard serves") as err:
        read(tmp_path, **fields)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM (model_type qwen2)"):
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ],
)
def test_unsupported_options_are_refused(tmp_path: Path, fields: dict, match: str) -> None:
    with pytest.raises(ModelConfigError, match=match):
        read(tmp_path, **fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"rope_theta": 500000.0, "rope_scaling": LLAMA3},  # transformers 4.x
        {"rope_parameters": {**LLAMA3, "rope_theta": 500000.0}},  # transformers 5.x
    ],
)
def test_llama3_rope_scaling_and_several_eos_ids(tmp_path: Path, fields: dict) -> None:
    cfg = read(tmp_path, eos_token_id=[128001, 128008, 128009], bos_token_id=128000, **fields)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert cfg.max_context == 4096


@pytest.mark.parametrize(
    ("fields", "window"),
    [
        ({"model_type": "mistral", "sliding_window": 1024}, 1024),
        ({"model_type": "mistral", "sliding_window": None}, None),
        ({"model_type": "mistral", "sliding_window": 8192}, 8192),
        # Qwen2.5 checkpoints carry a window they do not use.
        ({"model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": False}, None),
        (
            {
                "model_type": "qwen2",
                "sliding_window": 1024,
                "use_sliding_window": True,
                "max_window_layers": 1,
            },
            1024,
        ),
        (
            {
                "model_type": "qwen2",
                "sliding_window": 1024,
                "use_sliding_window": True,
                "max_window_layers": 2,
            },
            None,
        ),
        (
            {
                "model_type": "qwen2",
                "sliding_window": 1024,
                "layer_types": ["full_attention", "sliding_attention"],
            },
            1024,
        ),
    ],
)
def test_context_stops_at_a_sliding_window(
    tmp_path: Path, fields: dict, window: int | None
) -> None:
    cfg = read(tmp_path, **fields)
    assert cfg.sliding_window == window
    assert cfg.max_context == min(4096, window or 4096)
