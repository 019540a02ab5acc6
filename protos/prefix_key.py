"""The prefix key of a request: what the router and the shards agree a shared prefix is called.

The router places requests without tokenizing them, so it cannot hash prompt blocks as the
shard's prefix cache does. Both sides instead hash what the raw request starts with: its adapter
id and the head of its input (the first `HEAD_CHARS` characters of a text prompt or of its
conversation, the first `HEAD_TOKENS` ids of a token prompt). A shard reports the keys of the
prefixes its cache holds in its load snapshots (`LoadSnapshot.prefix_keys`); the router computes
the key of each request it places and prefers a shard that reports it.

A conversation is read as its messages' roles and contents in order, so a long system prompt
alone decides the key, and a short one is joined by the first turns (each conversation then has
a key of its own, shared by its later turns). A request whose input is shorter than the head has
no key: a short shared prefix is not worth steering placement for.

Torch-free and protobuf-only: the router and the shards import it.
"""

from __future__ import annotations

import hashlib

from protos import generate_pb2

# Characters of a text prompt or conversation that make its key (about 64 tokens of English).
HEAD_CHARS = 256
# Ids of a token prompt that make its key.
HEAD_TOKENS = 64


def prefix_key(request: generate_pb2.GenerateRequest) -> int | None:
    """The request's prefix key (an unsigned 64-bit integer), or None when its input is shorter
    than the head."""
    which = request.WhichOneof("input")
    if which == "prompt_token_ids":
        ids = request.prompt_token_ids.ids
        if len(ids) < HEAD_TOKENS:
            return None
        head = b"t" + b"".join(i.to_bytes(4, "little") for i in ids[:HEAD_TOKENS])
    elif which == "messages":
        text = ""
        for message in request.messages.messages:
            text += f"{message.role}\0{message.content}\0"
            if len(text) >= HEAD_CHARS:
                break
        if len(text) < HEAD_CHARS:
            return None
        head = b"m" + text[:HEAD_CHARS].encode()
    elif which == "prompt":
        if len(request.prompt) < HEAD_CHARS:
            return None
        head = b"p" + request.prompt[:HEAD_CHARS].encode()
    else:
        return None
    digest = hashlib.blake2b(request.adapter_id.encode() + b"\0" + head, digest_size=8)
    return int.from_bytes(digest.digest(), "little")
