"""The model's own chat template: renders a conversation into prompt token ids.

Rendering follows transformers' `apply_chat_template(add_generation_prompt=True)` exactly: the
template from `chat_template.jinja` or `tokenizer_config.json` runs in a sandboxed Jinja
environment with `trim_blocks` and `lstrip_blocks`, sees `messages`, `add_generation_prompt`,
`tools` / `documents` (None) and the tokenizer's named special tokens (`bos_token`, ...), and may
call `raise_exception` and `strftime_now`; the text is then tokenized without adding special
tokens, since the template writes them itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# The named special tokens transformers hands every chat template.
_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class ChatTemplateError(ValueError):
    """A conversation the template refuses, or a template that cannot be read."""


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which a prompt must not get.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template bound to its tokenizer and special tokens."""

    def __init__(self, source: str, tokenizer: Tokenizer, special_tokens: dict[str, str]) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the model's chat template does not compile: {e}") from e
        self._tokenizer = tokenizer
        self._special_tokens = dict(special_tokens)

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text of `messages`, ending with the assistant's generation prompt."""
        if not messages:
            raise ChatTemplateError("messages is empty: send at least one message")
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self._special_tokens,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template refused the messages: {e}") from e

    def encode(self, messages: Sequence[Message]) -> tuple[int, ...]:
        """Prompt token ids of `messages`."""
        text = self.render(messages)
        return tuple(self._tokenizer.encode(text, add_special_tokens=False).ids)


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    source = config.get("chat_template")
    if isinstance(source, list):
        # Several named templates: the one named "default" is what apply_chat_template uses.
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return source if isinstance(source, str) and source else None


def load_chat_template(model_dir: Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The chat template of a Hugging Face model folder; None when the model has none."""
    config_path = model_dir / "tokenizer_config.json"
    config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
    source = _template_source(model_dir, config)
    if source is None:
        return None
    special: dict[str, str] = {}
    map_path = model_dir / "special_tokens_map.json"
    named = json.loads(map_path.read_text()) if map_path.is_file() else {}
    for name in _SPECIAL_TOKEN_NAMES:
        # tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        text = _token_text(config.get(name)) or _token_text(named.get(name))
        if text is not None:
            special[name] = text
    return ChatTemplate(source, tokenizer, special)
