"""Incremental detokenisation and stop strings with the real SmolLM2 tokenizer (byte-level BPE, offline)."""

from __future__ import annotations

import itertools
import random

import pytest

from autodeploy.executor.detokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopChecker,
    find_stop_string,
)

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "日本語のテキストと中文文本，还有한국어도 있어요。",
    "Emoji: 🎉👨‍👩‍👧‍👦 🇫🇷 🤖✨ and a family 👩🏽‍💻 at work.",
    "Mixed naïve café Ünïcödé — “quotes” … ½ ∑ ∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚",
    "def f(x):\n    return x ** 2  # 平方\n\n\tprint('done')\n",
    "   leading spaces and trailing   ",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from autodeploy.models import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def stream(tokenizer, ids: list[int], prompt: list[int] = (), skip: bool = True, chunks=None) -> list[str]:
    """Push ``ids`` in chunks of the given sizes (default: one token each); return the pieces, flush last."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt), skip_special_tokens=skip)
    pieces, i = [], 0
    for size in chunks or [1] * len(ids):
        pieces.append(detok.push(ids[i : i + size]))
        i += size
    assert i == len(ids)
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces) and detok.token_ids == ids
    return pieces


# ---- incremental text --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_pieces_concatenate_to_decode(tokenizer, text: str):
    ids = tokenizer.encode(text)
    assert len(ids) > 5
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in p for p in pieces), pieces  # no half-decoded UTF-8 sequence
    assert pieces[-1] == ""  # nothing was left held at the end
    rng = random.Random(len(text))
    sizes = []
    while sum(sizes) < len(ids):
        sizes.append(min(rng.randint(1, 4), len(ids) - sum(sizes)))
    assert "".join(stream(tokenizer, ids, chunks=sizes)) == text


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("a🎉")
    emoji_tokens = ids[1:]
    assert len(emoji_tokens) > 1  # the emoji spans several byte tokens
    pieces = stream(tokenizer, ids)
    assert pieces[0] == "a"
    assert pieces[1 : len(ids) - 1] == [""] * (len(emoji_tokens) - 1)
    assert pieces[len(ids) - 1] == "🎉" and pieces[-1] == ""


def test_prompt_gives_context_but_is_not_output(tokenizer):
    prompt = tokenizer.encode("Translate: 世界")
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert "".join(stream(tokenizer, ids, prompt)) == tokenizer.decode(ids)


def test_random_token_ids_concatenate_to_decode(tokenizer):
    """Arbitrary byte tokens (invalid UTF-8 included) still give exactly ``decode`` once flushed."""
    rng = random.Random(0)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    byte_tokens = vocab[:300]  # the byte alphabet sits at the start of the vocabulary
    for _ in range(20):
        ids = [rng.choice(byte_tokens if rng.random() < 0.5 else vocab) for _ in range(rng.randint(1, 40))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip: bool):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Hi 🎉 there") + [im_end] + tokenizer.encode("\nnext 世界") + [im_end]
    text = "".join(stream(tokenizer, ids, skip=skip))
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) == (not skip)


def test_flush_emits_an_unfinished_sequence(tokenizer):
    ids = tokenizer.encode("ok 🎉")[:-1]  # cut inside the emoji's bytes
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push([t]) for t in ids) == "ok"
    tail = detok.flush()
    assert tail.endswith(REPLACEMENT_CHAR) and detok.text == tokenizer.decode(ids)
    assert detok.flush() == ""


# ---- stop strings ------------------------------------------------------------------------------------------
def run_with_stops(tokenizer, text: str, stop: list[str], include: bool):
    """Stream ``text`` token by token, checking stops: (final text, stop, step, streamed snapshots, ids)."""
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    checker = StopChecker(stop, include)
    shown: list[str] = []
    for step, t in enumerate(ids):
        detok.push([t])
        hit = checker.check(detok.text)
        if hit is not None:
            return hit[0], hit[1], step, shown, ids
        shown.append(checker.streamable(detok.text))
    return detok.text, None, len(ids), shown, ids


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer, include: bool):
    text = "The answer is 42.\nEND of the story, never shown."
    stop = "42.\nEND"
    ids = tokenizer.encode(text)
    assert not any(stop in tokenizer.decode([t]) for t in ids)  # no single token holds it
    final, matched, step, shown, _ = run_with_stops(tokenizer, text, ["never", stop], include)
    assert matched == stop
    assert final == ("The answer is 42.\nEND" if include else "The answer is ")
    # found at the very token that completes it
    assert stop in tokenizer.decode(ids[: step + 1]) and stop not in tokenizer.decode(ids[:step])
    for snapshot in shown:  # streamed text never has to be taken back
        assert final.startswith(snapshot)
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(shown))  # and only grows


def test_stop_string_with_multibyte_text(tokenizer):
    final, matched, *_ = run_with_stops(tokenizer, "価格は🎉100円です。次へ", ["円で", "🎉1"], include=False)
    assert (final, matched) == ("価格は", "🎉1")
    final, matched, *_ = run_with_stops(tokenizer, "価格は🎉100円です。次へ", ["円で"], include=True)
    assert (final, matched) == ("価格は🎉100円で", "円で")


def test_holdback_while_streaming(tokenizer):
    text = "Say hello world and then hello there!"
    final, matched, _, shown, ids = run_with_stops(tokenizer, text, ["hello there"], include=False)
    assert (final, matched) == ("Say hello world and then ", "hello there")
    # while "hello" could start the stop string it is not shown; once it cannot, it is
    for k, snapshot in enumerate(shown):
        decoded = tokenizer.decode(ids[: k + 1])
        if decoded.endswith(" hello"):
            assert not snapshot.endswith("hello")
        if decoded == "Say hello world":
            assert snapshot == "Say hello world"
    # with include_stop_str_in_output nothing needs holding back
    _, _, _, shown, ids = run_with_stops(tokenizer, text, ["hello there"], include=True)
    assert all(s == tokenizer.decode(ids[: k + 1]) for k, s in enumerate(shown))


def test_holdback_unit():
    checker = StopChecker(["</answer>", "STOP"])
    assert checker.holdback("text </ans") == 5
    assert checker.holdback("text <") == 1
    assert checker.holdback("the ST") == 2
    assert checker.holdback("the STx") == 0
    assert checker.streamable("abc </answe") == "abc "
    assert StopChecker(["abc"], include_stop_str_in_output=True).holdback("xab") == 0
    assert StopChecker([]).holdback("abc") == 0


def test_first_ending_match_wins_whatever_the_chunking():
    assert find_stop_string("xxabcyy", ["abc", "b"]) == ("xxa", "b")
    assert find_stop_string("xxabcyy", ["bc", "abc"]) == ("xx", "abc")  # same end: the longer
    assert find_stop_string("xxabcyy", ["bc", "abc"], include_stop_str_in_output=True) == ("xxabc", "abc")
    assert find_stop_string("no match", ["abc"]) is None
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        include = rng.random() < 0.5
        whole = find_stop_string(text, stops, include)
        checker, hit, end = StopChecker(stops, include), None, 0
        while hit is None and end < len(text):
            end = min(len(text), end + rng.randint(1, 5))
            hit = checker.check(text[:end])
            if hit is None:
                assert whole is None or whole[0].startswith(checker.streamable(text[:end]))
        assert hit == whole, (text, stops)
