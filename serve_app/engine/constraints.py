"""JSON output by constrained decoding: a per-row token mask from a grammar matcher (xgrammar), applied in the batched
sampler to the rows that asked for `response_format` JSON, while other rows in the same batch sample freely.

`Grammars(tokenizer, vocab_size, stop_ids)` belongs to one engine; `Grammars.matcher(json_schema)` compiles a
schema ("" = any JSON object) once (cached by xgrammar) and returns a fresh `JsonConstraint` for one sequence.
`check_schema(schema)` validates a schema without a tokenizer (the HTTP layer answers 400 before queueing).
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class GrammarError(ValueError):
    """A JSON schema the grammar library cannot compile (answered as a 400 naming `response_format`)."""


def check_schema(schema: dict[str, Any] | None) -> None:
    """Raise GrammarError when `schema` cannot be turned into a grammar."""
    if schema is None:
        return
    import xgrammar as xgr

    try:
        xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception as err:  # xgrammar raises RuntimeError with the reason (unsupported type, bad $ref, ...)
        raise GrammarError(f"the JSON schema is not supported: {str(err).splitlines()[-1][-300:]}") from None


class JsonConstraint:
    """The grammar state of one sequence: which tokens may come next, advanced by every accepted token."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self._matcher = matcher
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place (`logits`: one row [V], float32)."""
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        self._xgr.apply_token_bitmask_inplace(logits.view(1, -1), self._bitmask.to(logits.device))

    def accept(self, token: int) -> bool:
        return bool(self._matcher.accept_token(token))

    @property
    def done(self) -> bool:
        return bool(self._matcher.is_terminated())


class Grammars:
    """Compiled JSON grammars for one tokenizer (built on the first constrained request, then cached)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        self._tokenizer, self.vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_ids)  # fmt: skip
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def matcher(self, json_schema: str) -> JsonConstraint:
        """A fresh constraint for one sequence; GrammarError if the schema cannot be compiled."""
        import xgrammar as xgr

        compiler = self._get_compiler()
        try:
            compiled = compiler.compile_json_schema(json_schema or '{"type": "object"}', any_whitespace=False)
        except Exception as err:
            raise GrammarError(f"the JSON schema is not supported: {str(err).splitlines()[-1][-300:]}") from None
        return JsonConstraint(xgr.GrammarMatcher(compiled), self.vocab_size)
