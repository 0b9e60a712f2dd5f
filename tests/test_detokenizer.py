"""Incremental detokenization: multi-byte characters, and stop strings split across tokens."""

from __future__ import annotations

import pytest

from adapters.tiny_llama import build_byte_tokenizer
from serve_app.engine.detokenizer import IncrementalDetokenizer


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


def test_the_backend_fast_path_decodes_exactly_like_the_tokenizer(tok) -> None:
    text = "héllo wörld — ✓ <|im_end|> tail"
    ids = tok(text, add_special_tokens=False).input_ids
    fast = IncrementalDetokenizer(tok, [1, 2])
    assert fast._backend_decode is not None
    slow = IncrementalDetokenizer(tok, [1, 2])
    slow._backend_decode = None  # the tokenizer's own decode
    assert [fast.add(t) for t in ids] + [fast.flush()] == [slow.add(t) for t in ids] + [slow.flush()]
