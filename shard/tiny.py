"""A tiny random Llama-family model (Llama, Mistral or Qwen2), its tokenizer and a set of PEFT
adapters, in real HF/PEFT file layouts.

`write_tiny(root)` writes `root/model/` (what `transformers.AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` read) and `root/adapters/<adapter_id>/` (what
`peft.PeftModel.from_pretrained` reads). `python -m shard.tiny OUT_DIR` does the same from a shell.
transformers and peft are imported only while writing: they are test dependencies, not the shard's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS
# transformers `model_type`s the tiny model can be written as.
FAMILIES = ("llama", "mistral", "qwen2")

LLAMA3_ROPE_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
# A Zephyr-style template (role headers as text, each turn closed by EOS), so the tiny model can
# chat; unknown roles go through raise_exception like real templates do.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Large enough that greedy top-2 logit gaps are well above float noise, so different
# implementations (fused kernels, TP splits, bf16 vs fp32 at the margin) agree on tokens.
_INIT_STD = 0.2
# Qwen2's q/k/v biases: transformers initialises them to zero, which would hide a shard that
# drops them; this size changes greedy tokens.
_BIAS_STD = 0.5
# Frobenius size of each LoRA delta relative to the base weight it adds to: large enough to
# change greedy tokens, small enough that logits stay in the base model's range.
_LORA_RELATIVE_SIZE = 0.6
_MARKER = "tiny.json"

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model still needs a real tokenizer, so this
text is the training data for one: it has words, numbers like 12, 345 and 6789, and punctuation!
Serving many adapters of one base model costs almost the same as serving the base model alone.
Each request names its adapter; the shard groups the rows of a batch by adapter and runs one
segmented matrix multiply per layer. The router sends each request to the busiest shard that
still has room, because larger batches use the accelerator better.
In the café on the corner, a naïve barista served crème brûlée and a jalapeño bagel. Señor Müller
paid in euros (€) and said «merci». 日本語のテキストも少し入っています。東京は大きい都市です。
Emoji travel too: 🙂 🚀 🍕 ✨. Greek: αβγ δέλτα. Russian: привет мир. Math: x² + y² = z², π ≈ 3.14.
Once upon a time there was a little model that wanted to generate text. It tried and tried, and
every token it produced was decoded back into bytes, and every byte found its way into a string.
"""


@dataclass(frozen=True, slots=True)
class TinySpec:
    """Shape of the tiny model; every field maps to one transformers config field."""

    family: str = "llama"  # the transformers model_type, one of FAMILIES
    num_layers: int = 3
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 160
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None  # None or e.g. LLAMA3_ROPE_SCALING
    num_shards: int = 1  # >1 writes a sharded checkpoint with model.safetensors.index.json
    max_position_embeddings: int = 256
    sliding_window: int | None = None  # Mistral's attention window; None: full attention

    def to_json(self) -> dict[str, Any]:
        """This spec as a JSON-serializable dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """One PEFT LoRA adapter: its folder name, rank, alpha and target modules."""

    adapter_id: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """The factor PEFT multiplies `x @ A.T @ B.T` by."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


ADAPTERS: tuple[AdapterSpec, ...] = (
    AdapterSpec("r4-qv", 4, 8.0, ("q_proj", "v_proj")),
    AdapterSpec("r8-all", 8, 16.0, ALL_TARGETS),
    AdapterSpec("r16-attn", 16, 16.0, ATTN_TARGETS),
    AdapterSpec("r32-mlp", 32, 64.0, MLP_TARGETS),
    AdapterSpec("r64-all-rslora", 64, 32.0, ALL_TARGETS, use_rslora=True),
)


@dataclass(frozen=True, slots=True)
class TinyPaths:
    """Where `write_tiny` put things, and what adapters it wrote."""

    root: Path
    model_dir: Path
    adapters_dir: Path
    adapters: tuple[AdapterSpec, ...] = field(default=ADAPTERS)

    @property
    def adapter_ids(self) -> tuple[str, ...]:
        """Folder names of the adapters under `adapters_dir`."""
        return tuple(a.adapter_id for a in self.adapters)

    def adapter_dir(self, adapter_id: str) -> Path:
        """The PEFT folder of one adapter."""
        return self.adapters_dir / adapter_id


def write_tiny(root: Path, *, seed: int = 0, spec: TinySpec = TinySpec()) -> TinyPaths:
    """Write the tiny model to `root/model/` and its adapters to `root/adapters/`.

    Deterministic in (`seed`, `spec`); returns at once when `root` already holds the same.
    """
    root = Path(root).resolve()
    paths = TinyPaths(root=root, model_dir=root / "model", adapters_dir=root / "adapters")
    marker = {
        "seed": seed,
        "spec": spec.to_json(),
        "adapters": [a.adapter_id for a in ADAPTERS],
        "chat_template": CHAT_TEMPLATE,
    }
    marker_path = root / _MARKER
    written = marker_path.exists() and (paths.model_dir / "config.json").exists()
    if written and json.loads(marker_path.read_text()) == marker:
        return paths
    for d in (paths.model_dir, paths.adapters_dir):
        shutil.rmtree(d, ignore_errors=True)
    paths.model_dir.mkdir(parents=True)

    tokenizer = write_tokenizer(paths.model_dir)
    model = _write_model(paths.model_dir, tokenizer, seed=seed, spec=spec)
    for i, adapter in enumerate(ADAPTERS):
        _write_adapter(paths.adapter_dir(adapter.adapter_id), model, adapter, seed=seed + 1 + i)
    marker_path.write_text(json.dumps(marker, indent=2) + "\n")
    return paths


def write_tokenizer(model_dir: Path) -> Tokenizer:
    """A small byte-level BPE tokenizer with Llama's conventions, saved into `model_dir`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=480,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Llama convention: encoding a prompt prepends <s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (model_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}, indent=2) + "\n"
    )
    return tokenizer


def _write_model(
    model_dir: Path, tokenizer: Tokenizer, *, seed: int, spec: TinySpec
) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if spec.family not in FAMILIES:
        raise ValueError(f"family {spec.family!r} is not one of {FAMILIES}")
    if spec.sliding_window is not None and spec.family != "mistral":
        raise ValueError("sliding_window is written for the mistral family only")
    if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
        raise ValueError(
            f"hidden_size={spec.hidden_size} must divide by num_heads={spec.num_heads}, "
            f"which must divide by num_kv_heads={spec.num_kv_heads}"
        )
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    family_fields = {"sliding_window": spec.sliding_window} if spec.family == "mistral" else {}
    config = AutoConfig.for_model(
        spec.family,
        vocab_size=-(-tokenizer.get_vocab_size() // 8) * 8,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=10000.0,
        rope_scaling=dict(spec.rope_scaling) if spec.rope_scaling else None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=_INIT_STD,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        dtype="float32",
        **family_fields,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, _BIAS_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, do_sample=False
    )
    model.save_pretrained(
        model_dir, safe_serialization=True, max_shard_size=_shard_size(model, spec.num_shards)
    )
    # PEFT records this as the adapters' base_model_name_or_path.
    model.name_or_path = str(model_dir)
    return model


def _shard_size(model: PreTrainedModel, num_shards: int) -> int:
    """The smallest `max_shard_size` that packs the weights into at most `num_shards` files."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state_dict = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    size = math.ceil(total / num_shards)
    while (
        len(split_torch_state_dict_into_shards(state_dict, max_shard_size=size).filename_to_tensors)
        > num_shards
    ):
        size += math.ceil(total / (64 * num_shards))
    return size


def _write_adapter(out: Path, base: PreTrainedModel, adapter: AdapterSpec, *, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        target_modules=list(adapter.targets),
        lora_dropout=0.0,
        bias="none",
        use_rslora=adapter.use_rslora,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # PEFT 0.21 reads a property that transformers 5 deprecated; nothing for us to change.
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(base, lora_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            a = module.lora_A["default"].weight  # [r, in]
            b = module.lora_B["default"].weight  # [out, r]
            # ||scaling * B @ A|| ~ scaling * std_a * std_b * sqrt(r * in * out); match it to
            # _LORA_RELATIVE_SIZE * ||W|| = _LORA_RELATIVE_SIZE * _INIT_STD * sqrt(in * out).
            std = math.sqrt(
                _LORA_RELATIVE_SIZE * _INIT_STD / (adapter.scaling * math.sqrt(adapter.rank))
            )
            a.copy_(torch.randn(a.shape, generator=gen) * std)
            b.copy_(torch.randn(b.shape, generator=gen) * std)
    peft_model.save_pretrained(out, safe_serialization=True)
    # Restores `base` to plain Linear layers for the next adapter.
    peft_model.unload()


def main(argv: list[str] | None = None) -> None:
    """`python -m shard.tiny OUT_DIR [--seed N]`: write the tiny model and print its two paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--llama3-rope-scaling", action="store_true")
    parser.add_argument("--num-shards", type=int, default=1)
    args = parser.parse_args(argv)
    spec = TinySpec(
        family=args.family,
        tie_word_embeddings=args.tie_word_embeddings,
        rope_scaling=LLAMA3_ROPE_SCALING if args.llama3_rope_scaling else None,
        num_shards=args.num_shards,
    )
    paths = write_tiny(args.out_dir, seed=args.seed, spec=spec)
    print(paths.model_dir)
    print(paths.adapters_dir)


if __name__ == "__main__":
    main()
