"""TextStream: deltas join to the decoded text, resume exactly, and honour stop strings."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from shard.engine.detokenizer import StreamDelta, TextStream
from shard.tiny import write_tiny

TEXTS = (
    "Hello world, this is a café with naïve customers.",
    " 日本語のテキスト and emoji 🙂🚀🍕 mixed in; πr² ≈ area.",
    "  leading spaces,\nnew lines\n\tand tabs  ",
    "The quick brown fox jumps over the lazy dog. STOP here? No: stop at END.",
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    paths = write_tiny(tmp_path_factory.mktemp("tiny"))
    return Tokenizer.from_file(str(paths.model_dir / "tokenizer.json"))


def _run(stream: TextStream, ids: list[int], rng: random.Random | None = None) -> list[StreamDelta]:
    """Push `ids` one at a time, or in random chunks when `rng` is given."""
    deltas = []
    i = 0
    while i < len(ids):
        n = 1 if rng is None else rng.randint(1, 4)
        deltas.append(stream.push(ids[i : i + n]))
        i += n
    return deltas


def _text(deltas: list[StreamDelta]) -> str:
    return "".join(d.text for d in deltas)


def _expected(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the stop string that ends first (the longest on a tie), if any."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if not hits:
        return text, False
    return text[: min(hits)[1]], True


def _random_case(tok: Tokenizer, rng: random.Random) -> tuple[list[int], list[int]]:
    """A prompt and a generation: random token ids (often invalid UTF-8) or real text."""
    vocab = tok.get_vocab_size()
    if rng.random() < 0.5:
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        generated = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
    else:
        prompt = tok.encode(rng.choice(TEXTS)).ids
        generated = tok.encode(rng.choice(TEXTS) + rng.choice(TEXTS), add_special_tokens=False).ids
    return prompt, generated


def test_deltas_join_to_decode_over_random_sequences(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(300):
        prompt, generated = _random_case(tok, rng)
        chunked = rng.random() < 0.5
        stream = TextStream(tok, prompt)
        deltas = _run(stream, generated, rng if chunked else None)
        assert _text(deltas) + stream.finish() == tok.decode(generated)
        assert not any(d.stopped for d in deltas)


def test_resume_at_every_split_continues_exactly(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(40):
        prompt, generated = _random_case(tok, rng)
        want = tok.decode(generated)
        for split in range(len(generated) + 1):
            first = TextStream(tok, prompt)
            sent = _text(_run(first, generated[:split]))  # then the first shard dies
            second = TextStream(tok, prompt, generated_ids=generated[:split])
            rest = _text(_run(second, generated[split:], rng)) + second.finish()
            assert sent + rest == want, (prompt, generated, split)


def test_valid_text_never_emits_broken_characters(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        stream = TextStream(tok, tok.encode("Say:").ids)
        deltas = _run(stream, ids)
        assert all("\ufffd" not in d.text for d in deltas)
        assert _text(deltas) + stream.finish() == text
    # A multi-byte character split over byte tokens is held back until complete.
    emoji = [tok.token_to_id(c) for c in "ðŁĻĤ"]  # byte-level symbols for the bytes of 🙂
    assert None not in emoji
    stream = TextStream(tok, [])
    assert [stream.push([t]).text for t in emoji] == ["", "", "", "🙂"]


def test_leading_space_of_first_generated_token_is_kept(tok: Tokenizer) -> None:
    prompt = tok.encode("Hello").ids
    generated = tok.encode(" world and more", add_special_tokens=False).ids
    stream = TextStream(tok, prompt)
    first = stream.push(generated[:1]).text
    assert first.startswith(" ")
    assert first + _text(_run(stream, generated[1:])) + stream.finish() == " world and more"


def test_special_tokens_add_no_text(tok: Tokenizer) -> None:
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    ids = tok.encode("naïve", add_special_tokens=False).ids
    stream = TextStream(tok, [bos])
    assert _text(_run(stream, [*ids, eos])) + stream.finish() == "naïve"


def test_stop_strings_over_random_texts_and_resumes(tok: Tokenizer) -> None:
    rng = random.Random(2)
    words = ["ab", "abc", "b", "ca", "fé", "🙂", " ", "x", "END", "日本"]
    stop_sets = [("abc",), ("b", "abc"), ("ca", "é"), ("🙂x",), ("END", " x"), ("日本語",)]
    stopped_runs = 0
    for _ in range(200):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        generated = tok.encode(text, add_special_tokens=False).ids
        stops = rng.choice(stop_sets)
        want, want_stopped = _expected(text, stops)
        stopped_runs += want_stopped
        for split in (0, rng.randint(0, len(generated)), len(generated)):
            first = TextStream(tok, [], stop=stops)
            first_deltas = _run(first, generated[:split])
            sent = _text(first_deltas)
            assert not any(s in sent for s in stops)
            if first.stopped:
                assert first_deltas[-1].stopped
                assert sent == want and want_stopped
                continue
            second = TextStream(tok, [], stop=stops, generated_ids=generated[:split])
            assert not second.stopped
            rest = _text(_run(second, generated[split:], rng)) + second.finish()
            assert sent + rest == want, (text, stops, split)
            assert second.stopped == want_stopped
    assert 20 < stopped_runs < 180


def test_text_that_may_start_a_stop_string_is_held_back(tok: Tokenizer) -> None:
    stream = TextStream(tok, [], stop=("STOP!",))
    encode = tok.encode
    assert stream.push(encode("go ST", add_special_tokens=False).ids) == StreamDelta("go ", False)
    assert stream.push(encode("O", add_special_tokens=False).ids) == StreamDelta("", False)
    assert stream.push(encode("RM", add_special_tokens=False).ids) == StreamDelta("STORM", False)
    assert stream.push(encode(" STO", add_special_tokens=False).ids) == StreamDelta(" ", False)
    assert stream.push(encode("P! more", add_special_tokens=False).ids) == StreamDelta("", True)
    assert stream.push(encode("ignored", add_special_tokens=False).ids) == StreamDelta("", True)
    assert stream.finish() == ""


def test_finish_flushes_held_text(tok: Tokenizer) -> None:
    stream = TextStream(tok, [], stop=("world",))
    assert stream.push(tok.encode("hello wor", add_special_tokens=False).ids).text == "hello "
    assert stream.finish() == "wor"
    with pytest.raises(RuntimeError):
        stream.push([5])


def test_empty_stop_string_is_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        TextStream(tok, [], stop=("",))


def test_stop_in_resumed_tokens_marks_stream_stopped(tok: Tokenizer) -> None:
    ids = tok.encode("one two three", add_special_tokens=False).ids
    stream = TextStream(tok, [], stop=("two",), generated_ids=ids)
    assert stream.stopped
    assert stream.push(ids[:1]) == StreamDelta("", True)


def test_leading_space_kept_with_a_metaspace_tokenizer() -> None:
    # SentencePiece-style decoders drop the space of a sequence's first "▁word"; the prompt
    # context is what keeps it in the middle of a stream.
    from tokenizers import decoders, models, pre_tokenizers, trainers

    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    prompt = sp.encode("Hello").ids
    generated = sp.encode("Hello world and more").ids[len(prompt) :]
    assert sp.decode(generated) == "world and more"
    stream = TextStream(sp, prompt)
    assert _text(_run(stream, generated)) + stream.finish() == " world and more"


def test_held_back_text_is_the_longest_suffix_that_starts_a_stop_string(tok: Tokenizer) -> None:
    # Few distinct characters, so suffixes often start stop strings, several of them at once.
    rng = random.Random(3)
    held_runs = 0
    for _ in range(300):
        stops = tuple(
            "".join(rng.choice("ab é") for _ in range(rng.randint(1, 5)))
            for _ in range(rng.randint(1, 3))
        )
        text = "".join(rng.choice("ab é") for _ in range(rng.randint(1, 12)))
        want, stopped = _expected(text, stops)
        if not stopped:
            held = max(
                (k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0
            )
            want = text[: len(text) - held]
            held_runs += held > 0
        ids = tok.encode(text, add_special_tokens=False).ids
        assert TextStream(tok, [], stop=stops).push(ids) == StreamDelta(want, stopped), (
            text,
            stops,
        )
    assert held_runs > 50
