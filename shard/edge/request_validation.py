"""Checks a GenerateRequest and turns it into an EngineRequest, with messages a user can act on."""

from __future__ import annotations

from tokenizers import Tokenizer

from protos import generate_pb2
from protos.prefix_key import prefix_key
from shard.edge.chat_template import ChatTemplate, ChatTemplateError, Message
from shard.engine.faults import quote
from shard.engine.sampling import SamplingParams
from shard.engine.sequence import EngineRequest, Resume, StopParams
from shard.model.config import ModelConfig

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_REQUEST_ID_CHARS = 256  # the same bound as the router's: ids are labels in logs
# Inputs larger than this (text characters, token ids) are checked and tokenized off the event
# loop, releasing the GIL; smaller ones cost less than the hand-off.
LARGE_INPUT = 4096
_LIMIT_NOTE = " (the model's context, or the whole KV pool when that is smaller)"


def _limit_note(model: ModelConfig) -> str:
    """What limits the context, naming a sliding window when it caps the model's."""
    if model.sliding_window is not None and model.max_context == model.sliding_window:
        return (
            f" (the model's sliding window of {model.sliding_window} tokens, which the shard does "
            "not serve past, or the whole KV pool when that is smaller)"
        )
    return _LIMIT_NOTE


class RequestError(ValueError):
    """The request is malformed (maps to INVALID_ARGUMENT)."""


class NoChatTemplate(RequestError):
    """The request is a conversation but the model has no chat template (FAILED_PRECONDITION)."""


def prompt_byte_bound(tokenizer: Tokenizer, max_context: int) -> int | None:
    """Bytes of text that surely tokenize to more than `max_context` tokens: every token covers
    at most the longest vocabulary entry's bytes. None when a tokenizer may fuse unknown
    characters into one token (then no byte count bounds the tokens)."""
    model = tokenizer.model
    if getattr(model, "fuse_unk", False):
        return None
    longest = max((len(t.encode()) for t in tokenizer.get_vocab()), default=1)
    return max_context * max(longest, 1)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`. A large text goes through `encode_batch`, which releases the GIL
    (`encode` holds it: a megabyte prompt then stalls every Python thread for seconds)."""
    if len(text) > LARGE_INPUT:
        return tokenizer.encode_batch([text])[0].ids
    return tokenizer.encode(text).ids


def to_engine_request(
    msg: generate_pb2.GenerateRequest,
    request_id: str,
    tokenizer: Tokenizer,
    model: ModelConfig,
    max_context: int,  # the longest request served: model context or KV pool, the smaller
    resume: Resume | None,
    migratable: bool,
    client_label: str = "",
    max_prompt_bytes: int | None = None,
    chat: ChatTemplate | None = None,
) -> EngineRequest:
    """Checks every field (RequestError names the first one wrong) and tokenizes the prompt.

    `max_prompt_bytes`: a longer text prompt cannot fit `max_context` tokens (see
    `prompt_byte_bound`) and is refused before the tokenizer spends seconds on it.
    """
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(
            f"request_id {quote(msg.request_id)} is longer than {MAX_REQUEST_ID_CHARS} "
            "characters: use a shorter id (it is only a label)"
        )
    which = msg.WhichOneof("input")
    if which == "prompt":
        if not msg.prompt:
            raise RequestError("prompt is empty: send a non-empty prompt or prompt_token_ids")
        size = len(msg.prompt.encode())
        if max_prompt_bytes is not None and size > max_prompt_bytes:
            raise RequestError(
                f"the prompt has {size} bytes, more than {max_context} tokens of this model "
                f"can hold ({max_prompt_bytes} bytes): it cannot fit the context, shorten it"
            )
        ids = tuple(encode(tokenizer, msg.prompt))
    elif which == "prompt_token_ids":
        ids = tuple(msg.prompt_token_ids.ids)
        if not ids:
            raise RequestError("prompt_token_ids is empty")
        bad = [t for t in ids if t >= model.vocab_size]
        if bad:
            raise RequestError(
                f"prompt_token_ids holds ids >= the vocabulary size {model.vocab_size}: {bad[:5]}"
            )
    elif which == "messages":
        size = sum(len(m.content.encode()) for m in msg.messages.messages)
        if max_prompt_bytes is not None and size > max_prompt_bytes:
            raise RequestError(
                f"the messages hold {size} bytes, more than {max_context} tokens of this model "
                f"can hold ({max_prompt_bytes} bytes): they cannot fit the context, shorten them"
            )
        ids = _chat_ids(msg.messages, chat)
    else:
        raise RequestError("no input: set prompt, prompt_token_ids or messages")

    stop = msg.stopping
    note = _limit_note(model)
    if len(ids) >= max_context:
        raise RequestError(
            f"the prompt has {len(ids)} tokens; the context this shard serves is {max_context} "
            f"tokens{note}: shorten it"
        )
    # Unset: up to the context limit, as OpenAI-compatible servers do; EOS or a stop string
    # usually ends it first.
    max_new = stop.max_new_tokens or max_context - len(ids)
    if len(ids) + max_new > max_context:
        raise RequestError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new}) exceeds the context of "
            f"{max_context} tokens this shard serves{note}: lower max_new_tokens to at most "
            f"{max_context - len(ids)}"
        )
    if len(stop.stop) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop.stop)}")
    for s in stop.stop:
        if not s or len(s.encode()) > MAX_STOP_BYTES:
            raise RequestError(f"stop strings must be 1..{MAX_STOP_BYTES} bytes, got {quote(s)}")

    sp = msg.sampling
    sampling = SamplingParams(
        temperature=sp.temperature,
        top_p=sp.top_p or 1.0,
        top_k=sp.top_k,
        repetition_penalty=sp.repetition_penalty or 1.0,
        seed=sp.seed if sp.HasField("seed") else None,
    )
    try:
        sampling.validate()
    except ValueError as e:
        raise RequestError(str(e)) from e
    if resume is not None:
        _check_resume(resume, len(ids), max_new, model.vocab_size)
    return EngineRequest(
        request_id=request_id,
        adapter_id=msg.adapter_id,
        prompt_ids=ids,
        sampling=sampling,
        stopping=StopParams(max_new, tuple(stop.stop), stop.ignore_eos),
        return_logprobs=msg.return_logprobs,
        resume=resume,
        migratable=migratable,
        client_label=client_label,
        prefix_key=prefix_key(msg),
    )


def _chat_ids(messages: generate_pb2.ChatMessages, chat: ChatTemplate | None) -> tuple[int, ...]:
    if chat is None:
        raise NoChatTemplate(
            "this model has no chat template (chat_template.jinja or tokenizer_config.json's "
            "chat_template): send a prompt instead of messages"
        )
    try:
        return chat.encode([Message(m.role, m.content) for m in messages.messages])
    except ChatTemplateError as e:
        raise RequestError(str(e)) from e


def _check_resume(resume: Resume, prompt_tokens: int, max_new: int, vocab_size: int) -> None:
    """A resumed request's tokens go back through the model: they must be valid ids."""
    done = resume.generated_ids
    if len(done) >= max_new:
        raise RequestError(
            f"resume.generated_token_ids holds {len(done)} tokens, max_new_tokens is {max_new}: "
            "nothing is left to generate"
        )
    bad = [t for t in done if t >= vocab_size]
    if bad:
        raise RequestError(
            f"resume.generated_token_ids holds ids >= the vocabulary size {vocab_size}: {bad[:5]}"
        )
