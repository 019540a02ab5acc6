"""The prefix key the router and the shards agree on (`protos.prefix_key`)."""

from __future__ import annotations

from protos import generate_pb2
from protos.prefix_key import HEAD_CHARS, HEAD_TOKENS, prefix_key

SYSTEM = "You are a careful assistant for a hardware store. " * 8  # > HEAD_CHARS


def _text(prompt: str, adapter: str = "a") -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(adapter_id=adapter, prompt=prompt)


def _chat(*turns: tuple[str, str], adapter: str = "a") -> generate_pb2.GenerateRequest:
    messages = [generate_pb2.ChatMessage(role=r, content=c) for r, c in turns]
    return generate_pb2.GenerateRequest(
        adapter_id=adapter, messages=generate_pb2.ChatMessages(messages=messages)
    )


def _ids(ids: list[int], adapter: str = "a") -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        adapter_id=adapter, prompt_token_ids=generate_pb2.TokenIds(ids=ids)
    )


def test_same_head_same_key_per_adapter_and_input_kind():
    key = prefix_key(_text(SYSTEM + "Where are the nails?"))
    assert key is not None and 0 <= key < 2**64
    assert prefix_key(_text(SYSTEM + "Do you sell paint?")) == key
    assert prefix_key(_text(SYSTEM + "x", adapter="b")) != key  # KV is never shared
    assert prefix_key(_text("Hi " + SYSTEM)) != key
    head = list(range(HEAD_TOKENS))
    assert prefix_key(_ids([*head, 1, 2])) == prefix_key(_ids([*head, 3])) is not None
    assert prefix_key(_ids([*head, 1], adapter="")) != prefix_key(_ids([*head, 1]))


def test_inputs_shorter_than_the_head_have_no_key():
    assert prefix_key(_text("x" * (HEAD_CHARS - 1))) is None
    assert prefix_key(_ids(list(range(HEAD_TOKENS - 1)))) is None
    assert prefix_key(_chat(("user", "hello"))) is None
    assert prefix_key(generate_pb2.GenerateRequest(adapter_id="a")) is None


def test_a_long_system_prompt_decides_a_conversation_key_a_short_one_is_joined_by_turns():
    long_a = prefix_key(_chat(("system", SYSTEM), ("user", "Where are the nails?")))
    long_b = prefix_key(_chat(("system", SYSTEM), ("user", "Do you sell paint?")))
    assert long_a == long_b is not None
    question = "I am building a shed and need to know which screws, brackets and hinges " * 4
    first_turn = _chat(("system", "Be brief."), ("user", question))
    later_turn = _chat(
        ("system", "Be brief."), ("user", question), ("assistant", "Deck screws."), ("user", "Ok")
    )
    other = _chat(("system", "Be brief."), ("user", "What is " + question))
    assert prefix_key(first_turn) == prefix_key(later_turn) is not None
    assert prefix_key(other) != prefix_key(first_turn)
