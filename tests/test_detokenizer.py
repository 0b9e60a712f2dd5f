"""Incremental detokenization: multi-byte characters, and stop strings split across tokens; and proof that
`tokenizers.decoders.DecodeStream` (what serve_app/engine/detokenizer.py uses) gives, piece by piece, exactly what
the window-decoding algorithm the engine used before gave, for both bundled tokenizers (the tiny byte-level test
tokenizer and SmolLM2's), on random token streams: arbitrary ids (special tokens, bytes that are not UTF-8),
non-ASCII text cut at any token, with and without stop strings.

Run: `pytest tests/test_detokenizer.py -q` (a few seconds; SmolLM2's tokenizer is converted from its GGUF on first
use, ~45 s, as for the other SmolLM2 tests).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from adapters.tiny_llama import build_byte_tokenizer
from serve_app.engine.detokenizer import IncrementalDetokenizer

# characters of several UTF-8 lengths: accents, CJK, emoji with joiners and skin tones, combining marks, symbols
NON_ASCII = "héllo wörld — ✓ ½ ∑∫ ÄÖÜß 日本語のテキスト 한국어 🎉👩‍👩‍👧👍🏽 e\u0301 ﬁ \t\n«»"


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def _feed(tok, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, tok("prompt", add_special_tokens=False).input_ids, stop)
    pieces = [detok.add(t) for t in tok(text, add_special_tokens=False).input_ids]
    pieces.append(detok.flush())
    return pieces, detok


def test_multibyte_characters_are_never_split(tok) -> None:
    pieces, _ = _feed(tok, "héllo wörld — ✓")
    assert "".join(pieces) == "héllo wörld — ✓"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_tokens_is_cut_and_never_leaked(tok) -> None:
    pieces, detok = _feed(tok, "answer: 42\n###\nmore text", stop=("###",))
    assert "".join(pieces) == "answer: 42\n"
    assert detok.stopped
    assert not any("#" in p for p in pieces)


def test_partial_stop_prefix_is_released_when_it_is_not_a_stop(tok) -> None:
    pieces, detok = _feed(tok, "a ## b", stop=("###",))
    assert "".join(pieces) == "a ## b" and not detok.stopped


class WindowDetokenizer(IncrementalDetokenizer):
    """The algorithm serve_app/engine/detokenizer.py used before DecodeStream (commit 6d91093): decode the window
    of ids since the last emission with and without the new token; emit the difference unless it ends in U+FFFD."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        super().__init__(tokenizer, prompt_ids, stop)
        self._ids = list(prompt_ids[-4:])
        self._prefix, self._read = 0, len(self._ids)

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._backend.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        new_text = self._backend.decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)


@pytest.fixture(scope="module")
def smollm2_tok():
    from transformers import AutoTokenizer

    from adapters.base_models import resolve_base

    return AutoTokenizer.from_pretrained(resolve_base("smollm2-135m").path)


def _pieces(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    return [detok.add(t) for t in ids] + [detok.flush()], detok.stopped


def _chat_prompt(tok: Any, content: str) -> list[int]:
    """The prompt ids the server builds for a chat request (serve_app/model_service.py)."""
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def _random_case(tok: Any, rng: random.Random) -> tuple[list[int], list[int], tuple[str, ...]]:
    """(prompt ids, generated ids, stop strings). Prompts are encoded text, as the server builds them."""
    vocab = len(tok)
    prompt_text = "".join(rng.choice(NON_ASCII + "abc xyz") for _ in range(rng.randint(1, 12)))
    prompt = tok(prompt_text, add_special_tokens=False).input_ids
    if rng.random() < 0.3:
        prompt = _chat_prompt(tok, prompt_text)
    kind = rng.randrange(3)
    if kind == 0:  # any ids at all: special tokens, single bytes that are not UTF-8 on their own
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
    elif kind == 1:  # non-ASCII text, started at any token (possibly inside a character)
        text = "".join(rng.choice(NON_ASCII) for _ in range(rng.randint(1, 40)))
        ids = tok(text, add_special_tokens=False).input_ids
        ids = ids[rng.randrange(len(ids)) :]
    else:  # text with random ids spliced in
        ids = tok("".join(rng.choice(NON_ASCII) for _ in range(20)), add_special_tokens=False).input_ids
        for _ in range(rng.randint(1, 5)):
            ids.insert(rng.randrange(len(ids) + 1), rng.randrange(vocab))
    stop: tuple[str, ...] = ()
    if rng.random() < 0.5:
        text = tok.decode(ids, skip_special_tokens=True).replace("\ufffd", "")
        start = rng.randrange(max(1, len(text)))
        stop = tuple(s for s in (text[start : start + rng.randint(1, 3)], rng.choice(["###", "ö", "\n"])) if s)
    return prompt, ids, stop


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_decode_stream_equals_the_window_algorithm_on_random_streams(tok, smollm2_tok, which: str) -> None:
    tokenizer = tok if which == "tiny" else smollm2_tok
    rng = random.Random(1234)
    stopped = 0
    for case in range(400):
        prompt, ids, stop = _random_case(tokenizer, rng)
        got = _pieces(IncrementalDetokenizer(tokenizer, prompt, stop), ids)
        want = _pieces(WindowDetokenizer(tokenizer, prompt, stop), ids)
        assert got == want, f"case {case}: prompt {prompt[-4:]}, ids {ids}, stop {stop!r}"
        stopped += got[1]
    assert stopped >= 50  # the stop strings really cut streams


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_streamed_text_is_the_tokenizers_decode_of_the_answer(tok, smollm2_tok, which: str) -> None:
    tokenizer = tok if which == "tiny" else smollm2_tok
    prompt = _chat_prompt(tokenizer, "hi")
    answer = "Sure — 日本語 🎉👩‍👩‍👧, naïve café; 1 ½ + ∑ <|im_end|> done"
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    pieces, _ = _pieces(IncrementalDetokenizer(tokenizer, prompt), ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces) and len([p for p in pieces if p]) > 5


def test_a_stream_error_restarts_the_stream_and_keeps_the_text(tok, monkeypatch) -> None:
    detok = IncrementalDetokenizer(tok, tok("prompt", add_special_tokens=False).input_ids)
    ids = tok("héllo", add_special_tokens=False).input_ids

    class Broken:
        def step(self, tokenizer: Any, token: int) -> str:
            raise Exception("Invalid prefix encountered")

    detok._stream = Broken()  # e.g. tokenizers' "invalid prefix" for a decoder whose output is not monotonic
    assert "".join([detok.add(t) for t in ids] + [detok.flush()]) == "héllo"


def test_a_slow_tokenizer_is_refused_with_the_reason() -> None:
    with pytest.raises(TypeError, match="fast"):
        IncrementalDetokenizer(object(), [1, 2])
