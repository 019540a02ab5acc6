"""Bounds the router checks before it forwards a request.

Ids and strings a client sends end up in gRPC metadata, log lines, metric labels and error
details: each is length-checked here, and every message quotes user input cut short, so no
request can make an answer too large for grpc's metadata limit or a log line megabytes long.
The shards check the same fields again (with the model and tokenizer at hand).
"""

from __future__ import annotations

from protos import generate_pb2

MAX_REQUEST_ID_CHARS = 256
# Adapter ids are folder names under a shard's adapter root (letters, digits, '.', '_', '-').
MAX_ADAPTER_ID_CHARS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
QUOTE_CHARS = 60


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` as repr, cut to `limit` characters with its full length noted."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(text)} chars)"


def problem(request: generate_pb2.GenerateRequest) -> str | None:
    """What makes the request unfit to forward (an INVALID_ARGUMENT message), or None."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        return (
            f"request_id {quote(request.request_id)} is longer than {MAX_REQUEST_ID_CHARS} "
            "characters: use a shorter id (it is only a label)"
        )
    if len(request.adapter_id) > MAX_ADAPTER_ID_CHARS:
        return (
            f"adapter_id {quote(request.adapter_id)} is longer than {MAX_ADAPTER_ID_CHARS} "
            "characters: adapter ids are folder names under the shards' adapter root "
            "(ListAdapters lists them)"
        )
    stops = request.stopping.stop
    if len(stops) > MAX_STOP_STRINGS:
        return f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}"
    for stop in stops:
        if not stop or len(stop.encode()) > MAX_STOP_BYTES:
            return f"stop strings must be 1..{MAX_STOP_BYTES} bytes, got {quote(stop)}"
    return None


def context_bound(request: generate_pb2.GenerateRequest) -> int:
    """Upper bound on the prompt's tokens before tokenization.

    Token ids count exactly; text counts its UTF-8 bytes, since a byte-level BPE token covers at
    least one byte (a conversation adds an allowance per message for the chat template's
    markup). Over-estimating only makes placement conservative.
    """
    which = request.WhichOneof("input")
    if which == "prompt_token_ids":
        return len(request.prompt_token_ids.ids)
    if which == "messages":
        # The chat template adds role headers and markers the router cannot see; allow for them.
        messages = request.messages.messages
        return sum(len(m.content.encode()) + len(m.role.encode()) + 16 for m in messages)
    return len(request.prompt.encode())
