"""The tiny model and adapters load with HF transformers/PEFT and behave as the tests need."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from shard.tiny import ALL_TARGETS, LLAMA3_ROPE_SCALING, TinyPaths, TinySpec, main, write_tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NON_ASCII = "A café, a naïve crème brûlée, 日本語 and emoji 🙂🚀 — plus ünknown \U0001d518 glyphs."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyPaths:
    return write_tiny(tmp_path_factory.mktemp("tiny"))


def _load_base(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _greedy(model, ids: torch.Tensor, n: int = 12) -> list[int]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0, ids.shape[1] :].tolist()


def test_model_files_have_hf_layout(tiny: TinyPaths) -> None:
    names = {p.name for p in tiny.model_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    config = json.loads((tiny.model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["head_dim"] == 16
    assert config["vocab_size"] % 8 == 0
    tok = Tokenizer.from_file(str(tiny.model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() <= config["vocab_size"]
    assert config["bos_token_id"] == tok.token_to_id("<s>")
    assert config["eos_token_id"] == tok.token_to_id("</s>")


def test_adapter_files_have_peft_layout(tiny: TinyPaths) -> None:
    assert len(tiny.adapters) >= 5
    assert len({a.rank for a in tiny.adapters}) == len(tiny.adapters)
    assert any(a.use_rslora for a in tiny.adapters)
    assert {tuple(sorted(a.targets)) for a in tiny.adapters} >= {tuple(sorted(ALL_TARGETS))}
    for adapter in tiny.adapters:
        folder = tiny.adapter_dir(adapter.adapter_id)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        assert config["r"] == adapter.rank
        assert config["lora_alpha"] == adapter.alpha
        assert config["use_rslora"] == adapter.use_rslora
        assert sorted(config["target_modules"]) == sorted(adapter.targets)
        assert Path(config["base_model_name_or_path"]) == tiny.model_dir
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            keys = set(f.keys())
            targets = {k.split(".")[-3] for k in keys}
            assert targets == set(adapter.targets)
            for key in keys:
                assert key.startswith("base_model.model.model.layers.")
                assert key.endswith((".lora_A.weight", ".lora_B.weight"))
                tensor = f.get_tensor(key)
                rank_dim = 0 if ".lora_A." in key else 1
                assert tensor.shape[rank_dim] == adapter.rank
                assert tensor.abs().sum() > 0, f"{key} is all zeros"
        if "q_proj" in adapter.targets:
            assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_tokenizer_round_trips_non_ascii(tiny: TinyPaths) -> None:
    tok = Tokenizer.from_file(str(tiny.model_dir / "tokenizer.json"))
    enc = tok.encode(NON_ASCII)
    assert enc.ids[0] == tok.token_to_id("<s>")
    assert tok.decode(enc.ids) == NON_ASCII
    hf = transformers.AutoTokenizer.from_pretrained(tiny.model_dir)
    assert hf.bos_token == "<s>" and hf.eos_token == "</s>"
    assert hf(NON_ASCII).input_ids == enc.ids
    assert hf.decode(enc.ids, skip_special_tokens=True) == NON_ASCII


def test_greedy_is_well_separated(tiny: TinyPaths) -> None:
    model = _load_base(tiny.model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits = model(torch.randint(2, 400, (8, 32), generator=gen)).logits
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[..., 0] - top2[..., 1]
    assert (gaps > 1e-3).float().mean() > 0.98
    assert logits.abs().max() < 50


def test_each_adapter_changes_greedy_tokens(tiny: TinyPaths) -> None:
    tok = Tokenizer.from_file(str(tiny.model_dir / "tokenizer.json"))
    ids = torch.tensor([tok.encode("The quick brown fox").ids])
    base_tokens = _greedy(_load_base(tiny.model_dir), ids)
    seen = {tuple(base_tokens)}
    for adapter_id in tiny.adapter_ids:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.PeftModel.from_pretrained(
                _load_base(tiny.model_dir), tiny.adapter_dir(adapter_id)
            ).eval()
        tokens = _greedy(model, ids)
        assert tokens != base_tokens, adapter_id
        seen.add(tuple(tokens))
    assert len(seen) == len(tiny.adapter_ids) + 1


def test_write_is_deterministic_and_idempotent(tiny: TinyPaths, tmp_path: Path) -> None:
    weights = tiny.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert write_tiny(tiny.root) == tiny
    assert weights.stat().st_mtime_ns == mtime
    other = write_tiny(tmp_path)
    assert (other.model_dir / "model.safetensors").read_bytes() == weights.read_bytes()
    write_tiny(tmp_path, seed=1)
    assert (other.model_dir / "model.safetensors").read_bytes() != weights.read_bytes()


def test_sharded_checkpoint_has_index_and_same_weights(tiny: TinyPaths, tmp_path: Path) -> None:
    sharded = write_tiny(tmp_path, spec=TinySpec(num_shards=3))
    index = json.loads((sharded.model_dir / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == 3
    assert all((sharded.model_dir / f).exists() for f in files)
    assert not (sharded.model_dir / "model.safetensors").exists()
    ids = torch.arange(2, 20)[None]
    with torch.no_grad():
        want = _load_base(tiny.model_dir)(ids).logits
        got = _load_base(sharded.model_dir)(ids).logits
    torch.testing.assert_close(got, want)


def test_tied_embeddings_and_llama3_rope_scaling(tmp_path: Path) -> None:
    spec = TinySpec(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE_SCALING, num_layers=2)
    paths = write_tiny(tmp_path, spec=spec)
    config = json.loads((paths.model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 2
    scaling = config.get("rope_scaling") or config["rope_parameters"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    with safe_open(str(paths.model_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model = _load_base(paths.model_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(2, 200)[None]).logits).all()


def test_cli_prints_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path)])
    model_dir, adapters_dir = capsys.readouterr().out.split()
    assert Path(model_dir) == tmp_path.resolve() / "model"
    assert sorted(p.name for p in Path(adapters_dir).iterdir()) == sorted(
        write_tiny(tmp_path).adapter_ids
    )
