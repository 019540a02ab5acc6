"""Chat on the shard: templates render and tokenize exactly as transformers' apply_chat_template,
EOS ids include generation_config.json's, and stop strings match special tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer

from protos import generate_pb2
from shard.edge.chat_template import ChatTemplateError, Message, load_chat_template
from shard.edge.request_validation import NoChatTemplate, RequestError, to_engine_request
from shard.engine.detokenizer import TextStream
from shard.model.config import load_model_config

# ChatML as SmolLM2 and Qwen write it: special tokens the tokenizer must keep whole.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3 style: whitespace control, namespace, loop controls, tojson and bos_token.
LLAMA3_LIKE = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = message['content'] | trim %}
        {%- continue %}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if ns.system and loop.index0 == 1 %}{{ ns.system | tojson }}\n{% endif %}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
SPECIALS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

CONVERSATIONS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "  Answer in one word «strictly».  "},
        {"role": "user", "content": "Café or thé? 日本語 🙂"},
        {"role": "assistant", "content": "Café."},
        {"role": "user", "content": 'Why?\n\tExplain <b>briefly</b> & "quote" it.'},
    ],
    [{"role": "user", "content": "Tokens like <|im_end|> inside content stay tokens."}],
)


def _model_dir(tiny, tmp: Path, template: str, as_file: bool) -> Path:
    """A copy of the tiny model's tokenizer with chat special tokens and `template`."""
    out = tmp / ("file" if as_file else "config")
    out.mkdir()
    for name in ("config.json", "special_tokens_map.json"):
        shutil.copy(tiny.model_dir / name, out / name)
    tok = Tokenizer.from_file(str(tiny.model_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((tiny.model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if as_file:
        (out / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("as_file", [False, True])
@pytest.mark.parametrize("template", [None, CHATML, LLAMA3_LIKE], ids=["tiny", "chatml", "llama3"])
def test_ids_equal_transformers_apply_chat_template(tiny, tmp_path, template, as_file) -> None:
    model_dir = tiny.model_dir
    if template is not None:
        model_dir = _model_dir(tiny, tmp_path, template, as_file)
    reference = AutoTokenizer.from_pretrained(model_dir)
    chat = load_chat_template(model_dir, Tokenizer.from_file(str(model_dir / "tokenizer.json")))
    assert chat is not None
    for conversation in CONVERSATIONS:
        want_text = reference.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        want_ids = reference.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        messages = [Message(m["role"], m["content"]) for m in conversation]
        assert chat.render(messages) == want_text
        assert list(chat.encode(messages)) == list(want_ids)
    if template is not None:
        # The special tokens in the template came out as single tokens.
        specials = {reference.convert_tokens_to_ids(s) for s in SPECIALS}
        assert specials & set(chat.encode([Message("user", "hi")]))


def test_template_errors_and_missing_template(tiny, tmp_path) -> None:
    tok = Tokenizer.from_file(str(tiny.model_dir / "tokenizer.json"))
    chat = load_chat_template(tiny.model_dir, tok)
    assert chat is not None
    with pytest.raises(ChatTemplateError, match="roles must be system, user or assistant"):
        chat.encode([Message("tool", "42")])
    with pytest.raises(ChatTemplateError, match="messages is empty"):
        chat.encode([])
    bare = _model_dir(tiny, tmp_path, "{{ messages[0]['content'] }}", as_file=False)
    (bare / "tokenizer_config.json").write_text("{}")
    assert load_chat_template(bare, tok) is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        load_chat_template(broken, tok)


def _request(*messages: tuple[str, str]) -> generate_pb2.GenerateRequest:
    chat = generate_pb2.ChatMessages(
        messages=[generate_pb2.ChatMessage(role=r, content=c) for r, c in messages]
    )
    return generate_pb2.GenerateRequest(messages=chat)


def test_messages_input_becomes_template_ids(tiny) -> None:
    tok = Tokenizer.from_file(str(tiny.model_dir / "tokenizer.json"))
    chat = load_chat_template(tiny.model_dir, tok)
    model = load_model_config(tiny.model_dir)
    msg = _request(("system", "Be brief."), ("user", "Hello there"))
    req = to_engine_request(msg, "r", tok, model, 256, None, False, "r", chat=chat)
    want = AutoTokenizer.from_pretrained(tiny.model_dir).apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    assert list(req.prompt_ids) == list(want)
    with pytest.raises(RequestError, match="roles must be"):
        to_engine_request(
            _request(("robot", "x")), "r", tok, model, 256, None, False, "r", chat=chat
        )
    with pytest.raises(RequestError, match="messages is empty"):
        to_engine_request(_request(), "r", tok, model, 256, None, False, "r", chat=chat)
    with pytest.raises(NoChatTemplate, match="no chat template"):
        to_engine_request(msg, "r", tok, model, 256, None, False, "r", chat=None)


def test_eos_ids_include_generation_config(tiny, tmp_path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = json.loads((tiny.model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config))
    assert load_model_config(model_dir).eos_token_ids == (config["eos_token_id"],)
    eos = config["eos_token_id"]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, eos, 9]}))
    assert load_model_config(model_dir).eos_token_ids == (eos, 7, 9)


def test_stop_string_matches_a_special_token(tiny, tmp_path) -> None:
    model_dir = _model_dir(tiny, tmp_path, CHATML, as_file=False)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    im_end = tok.token_to_id("<|im_end|>")
    text_ids = tok.encode("Paris is big", add_special_tokens=False).ids
    stream = TextStream(tok, [5, 6], stop=["<|im_end|>", "big!"])
    deltas = [stream.push([t]) for t in text_ids]
    last = stream.push([im_end])
    assert last.stopped and not any(d.stopped for d in deltas)
    # "big" was held back as a possible start of "big!", and comes out before the stop.
    assert "".join(d.text for d in deltas) + last.text == "Paris is big"
    # Without the stop string the special token is just skipped text.
    plain = TextStream(tok, [5, 6])
    assert not plain.push([im_end]).stopped
