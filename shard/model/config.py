"""The base model's architecture, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The Hugging Face classes this shard serves, each with the `model_type` its config.json names.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED = ", ".join(f"{a} (model_type {t})" for a, t in ARCHITECTURES.items())


class ModelConfigError(ValueError):
    """The model folder cannot be served (missing files or an unsupported architecture)."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3 style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a Llama-family model (Llama 2/3, Mistral, Qwen2/2.5)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    architecture: str = "LlamaForCausalLM"  # a key of ARCHITECTURES
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = None  # attention window of the checkpoint's windowed layers

    @property
    def max_context(self) -> int:
        """Longest context served: within a sliding window full attention is the same
        computation, and the shard implements no other, so a windowed model stops there."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection by its HF name, e.g. `k_proj`."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        return shapes[module]


def _rope_scaling(raw: dict | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ModelConfigError(f"rope_scaling type {kind!r} is not supported (supported: llama3)")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


def _architecture(raw: dict) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    model_type = raw.get("model_type")
    if not archs:
        by_type = {t: a for a, t in ARCHITECTURES.items()}
        if model_type in by_type:
            return by_type[model_type]
        if model_type is None:
            return "LlamaForCausalLM"
    raise ModelConfigError(
        f"architecture {archs or model_type!r} is not supported; the shard serves {SUPPORTED}"
    )


def _sliding_window(raw: dict, num_layers: int) -> int | None:
    """The window of the layers that attend to a sliding window, None when all attend to the
    whole context. Qwen2 writes a window it does not use unless `use_sliding_window` is set."""
    window = raw.get("sliding_window")
    if window is None:
        return None
    if (types := raw.get("layer_types")) is not None:
        return int(window) if "sliding_attention" in types else None
    if raw.get("model_type") == "qwen2":
        first = raw.get("max_window_layers", 0)
        return int(window) if raw.get("use_sliding_window") and first < num_layers else None
    return int(window)


def _refuse_unsupported(raw: dict, arch: str) -> None:
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise ModelConfigError(
                f"{arch} with {flag}=true is not supported: of the biases, only Qwen2's on "
                "q/k/v are"
            )


def _eos_ids(eos: int | list[int] | None) -> tuple[int, ...]:
    """config.json's `eos_token_id`: one id, or several (Llama 3 lists two or three)."""
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def _with_generation_eos(eos_ids: tuple[int, ...], model_dir: Path) -> tuple[int, ...]:
    """config.json's EOS ids followed by generation_config.json's others: chat models end a turn
    with a token only the latter names (Llama 3's `<|eot_id|>`), and transformers' generate()
    stops at any of them."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return eos_ids
    eos = json.loads(path.read_text()).get("eos_token_id")
    extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    return tuple(dict.fromkeys([*eos_ids, *(int(e) for e in extra)]))


def load_model_config(model_dir: Path) -> ModelConfig:
    """Reads `config.json` of a Hugging Face Llama-family folder."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{path} not found: --model must be a Hugging Face model folder")
    raw = json.loads(path.read_text())
    arch = _architecture(raw)
    _refuse_unsupported(raw, arch)
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    layers = int(raw["num_hidden_layers"])
    rope_params = raw.get("rope_parameters") or {}
    return ModelConfig(
        name=model_dir.resolve().name,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(raw.get("rope_scaling") or rope_params or None),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_with_generation_eos(_eos_ids(raw.get("eos_token_id")), model_dir),
        architecture=arch,
        qkv_bias=arch == "Qwen2ForCausalLM",
        sliding_window=_sliding_window(raw, layers),
    )
