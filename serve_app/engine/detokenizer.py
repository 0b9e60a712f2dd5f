"""Incremental detokenization with stop strings.

Decoding token by token breaks multi-byte characters and word-piece spacing; `tokenizers.decoders.DecodeStream`
(the Rust tokenizer's own incremental decoder) emits only text that is final. It starts from the last few prompt
tokens, so a tokenizer that merges or strips spaces decodes the first generated token as it would mid-text. For the
bundled tokenizers it gives exactly what the window-decoding algorithm this project used before gave
(tests/test_detokenizer.py compares them on random token streams). Text that could be the start of a stop string
is held back until it is known not to be; when a stop string appears, the text is cut before it and the sequence
ends.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers.decoders import DecodeStream

log = logging.getLogger(__name__)

CONTEXT_TOKENS = 4  # prompt tokens the stream starts from


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"incremental detokenization needs a fast (Rust) tokenizer, not {type(tokenizer).__name__}")
        self._backend = backend
        self._stream = self._start(list(prompt_ids[-CONTEXT_TOKENS:]))
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all final text so far (before stop-string handling)
        self._emitted = 0  # characters of self.text already returned
        self.stopped = False

    def _start(self, context: list[int]) -> DecodeStream:
        """A stream past `context`; without it if the context ends inside a character (its text not final)."""
        stream = DecodeStream(skip_special_tokens=True)
        if context and stream.step(self._backend, context) is None:
            stream = DecodeStream(skip_special_tokens=True)
        return stream

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as err:  # "invalid prefix": a decoder whose text for more tokens does not extend the last
            log.warning("detokenizer: %s; restarting the stream at token %d", err, token_id)
            self._stream = DecodeStream(skip_special_tokens=True)
            return self._stream.step(self._backend, token_id)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that may be emitted now (nothing once a stop string was seen)."""
        if self.stopped:
            return ""
        piece = self._step(token_id)
        if piece:
            self.text += piece
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        if self.stopped and self._emitted >= len(self.text):
            return ""
        if self._stop and not self.stopped:
            start = max(0, self._emitted - self._hold)
            cut = min((i for i in (self.text.find(s, start) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
                final = True
        end = len(self.text) if final or self.stopped else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def flush(self) -> str:
        """The held-back text, at the end of the sequence."""
        return self._release(final=True)
