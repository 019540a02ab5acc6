"""OpenAI request bodies -> `GenerateRequest`, and `GenerateResponse` chunks -> OpenAI objects."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protos import generate_pb2
from router.openai_api.errors import bad_request
from router.openai_api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CommonFields,
    CompletionRequest,
)

# OpenAI's default for /v1/completions; chat completions run to EOS or the context limit.
COMPLETION_DEFAULT_MAX_TOKENS = 16
# OpenAI's default temperature (the proto's 0 would mean greedy).
DEFAULT_TEMPERATURE = 1.0

_FINISH = {
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_EOS: "stop",
}


def _common(body: CommonFields, adapter_id: str, max_tokens: int) -> generate_pb2.GenerateRequest:
    """The fields both endpoints map alike; refuses what the engine cannot do."""
    if body.n != 1:
        raise bad_request(f"n must be 1 (one choice per request), got {body.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise bad_request(
                f"{name} is not supported; use repetition_penalty (>1 discourages repeats)", name
            )
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    sampling = generate_pb2.SamplingParams(
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        repetition_penalty=body.repetition_penalty or 0.0,
    )
    if body.seed is not None:
        sampling.seed = body.seed
    return generate_pb2.GenerateRequest(
        adapter_id=adapter_id,
        sampling=sampling,
        stopping=generate_pb2.StoppingCriteria(
            max_new_tokens=max_tokens, stop=stop, ignore_eos=body.ignore_eos
        ),
    )


def _content(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"messages[{index}].content holds a {part.type!r} part; only text is served",
                f"messages[{index}].content",
            )
        texts.append(part.text)
    return "".join(texts)


def chat_request(body: ChatCompletionRequest, adapter_id: str) -> generate_pb2.GenerateRequest:
    """A GenerateRequest with `messages`, rendered by the model's chat template on the shard."""
    if body.tools:
        raise bad_request("tools are not supported", "tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    if body.top_logprobs:
        raise bad_request(
            "top_logprobs is not supported: the engine returns only the chosen token's logprob; "
            "send logprobs: true with top_logprobs 0",
            "top_logprobs",
        )
    max_tokens = body.max_completion_tokens or body.max_tokens or 0
    request = _common(body, adapter_id, max_tokens)
    request.messages.messages.extend(
        generate_pb2.ChatMessage(role=m.role, content=_content(m, i))
        for i, m in enumerate(body.messages)
    )
    request.return_logprobs = body.logprobs
    return request


def completion_request(body: CompletionRequest, adapter_id: str) -> generate_pb2.GenerateRequest:
    """A GenerateRequest with the prompt as text or token ids."""
    for name, unsupported in (
        ("echo", body.echo),
        ("suffix", body.suffix),
        ("best_of", body.best_of not in (None, 1)),
    ):
        if unsupported:
            raise bad_request(f"{name} is not supported", name)
    if body.logprobs:
        raise bad_request(
            "logprobs > 0 is not supported: the engine returns only the chosen token's logprob; "
            "send logprobs: 0",
            "logprobs",
        )
    request = _common(body, adapter_id, body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS)
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        request.prompt = prompt
    elif all(isinstance(t, int) for t in prompt):
        request.prompt_token_ids.ids.extend(prompt)  # type: ignore[arg-type]
    else:
        raise bad_request("one prompt per request (a string or a list of token ids)", "prompt")
    request.return_logprobs = body.logprobs is not None
    return request


def finish_reason(chunk: generate_pb2.GenerateResponse) -> str | None:
    """OpenAI's finish_reason of a chunk; None until the last one."""
    if chunk.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return _FINISH[chunk.finish_reason]


def usage(chunk: generate_pb2.GenerateResponse) -> dict[str, Any]:
    """OpenAI's usage object from the last chunk's usage; `prompt_tokens_details.cached_tokens`
    counts the prompt tokens the shard's prefix cache served (as OpenAI and vLLM report them)."""
    prompt, completion = chunk.usage.prompt_tokens, chunk.usage.generated_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": chunk.usage.cached_prompt_tokens},
    }


def chat_logprobs(chunks: Sequence[generate_pb2.GenerateResponse]) -> dict[str, Any]:
    """`choices[].logprobs` of a chat completion: one entry per token."""
    content = [
        {"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []}
        for c in chunks
        for text, lp in zip(c.token_texts, c.logprobs, strict=True)
    ]
    return {"content": content}


def completion_logprobs(
    chunks: Sequence[generate_pb2.GenerateResponse], offset: int = 0
) -> dict[str, Any]:
    """`choices[].logprobs` of a (legacy) completion; offsets count from `offset`."""
    tokens = [t for c in chunks for t in c.token_texts]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for c in chunks for lp in c.logprobs],
        "top_logprobs": None,
        "text_offset": offsets,
    }


@dataclass(frozen=True, slots=True)
class Envelope:
    """The fields every object of one response repeats."""

    id: str
    object: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, kind: str, model: str) -> Envelope:
        return cls(f"{prefix}-{uuid.uuid4().hex}", kind, int(time.time()), model)

    def wrap(self, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            **fields,
        }
