"""Loads a Hugging Face Llama-family folder (Llama, Mistral, Qwen2): config, safetensors weights
(one file or sharded with an index), tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from shard.model.config import ModelConfig, ModelConfigError
from shard.model.llama import LlamaDecoderLayer, LlamaForCausalLM
from shard.model.projections import ATTENTION, GATE_UP, MLP, QKV
from shard.model.sharding import input_cols, output_rows
from shard.parallel.group import TPGroup

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_WEIGHTS = (
    "input_layernorm",
    "post_attention_layernorm",
    *(f"self_attn.{m}" for m in ATTENTION),
    *(f"mlp.{m}" for m in MLP),
)


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files; refuses pickle checkpoints."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(
            f"no *.safetensors weights in {model_dir} (pickle .bin checkpoints are not loaded)"
        )
    return files


def load_tokenizer(model_dir: Path) -> Tokenizer:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelConfigError(f"{path} not found: the shard needs a fast tokenizer file")
    return Tokenizer.from_file(str(path))


def load_weights(model: LlamaForCausalLM, model_dir: Path, group: TPGroup) -> None:
    """Copies every checkpoint tensor into the model, each rank taking its slice."""
    cfg = model.config
    seen: set[str] = set()
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if _load_one(model, cfg, group, name, f.get_tensor(name)):
                    seen.add(name)
    missing = sorted(expected_tensors(cfg) - seen)
    if missing:
        shown = ", ".join(missing[:4]) + (
            f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        )
        raise ModelConfigError(f"checkpoint in {model_dir} lacks {shown}")


def expected_tensors(cfg: ModelConfig) -> set[str]:
    """Every checkpoint tensor name the model needs."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(cfg.num_layers):
        names.update(f"model.layers.{i}.{w}.weight" for w in _LAYER_WEIGHTS)
        if cfg.qkv_bias:
            names.update(f"model.layers.{i}.self_attn.{p}.bias" for p in QKV)
    return names


def _load_one(
    model: LlamaForCausalLM, cfg: ModelConfig, group: TPGroup, name: str, w: torch.Tensor
) -> bool:
    if name == "model.embed_tokens.weight":
        model.embed_tokens.load(w)
    elif name == "lm_head.weight":
        if not cfg.tie_word_embeddings:
            model.lm_head.load(w)
    elif name == "model.norm.weight":
        model.norm.weight.data.copy_(w)
    else:
        m = _LAYER.match(name)
        if m is None:
            return False
        layer = model.layers[int(m.group(1))]
        assert isinstance(layer, LlamaDecoderLayer)  # what ModuleList indexing gives back
        part, _, module = m.group(2).rpartition(".")
        if m.group(3) == "bias":
            if not (cfg.qkv_bias and part == "self_attn" and module in QKV):
                raise ModelConfigError(
                    f"checkpoint tensor {name}: {cfg.architecture} has no bias there "
                    "(of the biases, only Qwen2's on q/k/v are supported)"
                )
            layer.self_attn.qkv_proj.load_bias(module, w, output_rows(cfg, group, module))
        elif part == "self_attn" and module in QKV:
            layer.self_attn.qkv_proj.load(module, w, output_rows(cfg, group, module))
        elif part == "self_attn" and module == "o_proj":
            layer.self_attn.o_proj.load(w, input_cols(cfg, group, module))
        elif part == "mlp" and module in GATE_UP:
            layer.mlp.gate_up_proj.load(module, w, output_rows(cfg, group, module))
        elif part == "mlp" and module == "down_proj":
            layer.mlp.down_proj.load(w, input_cols(cfg, group, module))
        elif m.group(2) in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, m.group(2)).weight.data.copy_(w)
        else:
            return False
    return True


def build_model(
    cfg: ModelConfig,
    model_dir: Path,
    group: TPGroup,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "safetensors",
) -> LlamaForCausalLM:
    """Constructs the model on `device` and loads its weights ("safetensors"), or fills them with
    seeded random values where they are ("dummy": benchmarks of shapes nobody can download here)."""
    model = LlamaForCausalLM(cfg, group, dtype, device)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, model_dir, group)
    return model.eval()


def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Norm scales 1, biases 0, every matrix N(0, std^2), generated on the weights' own device."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
