"""The `delta` and `end` events a model replica streams for engine outputs (see serve_app/model_service.py), with
token ids, token texts and logprobs when the request asked for them. Plain dicts: they cross Ray's process boundary.

    {"type": "delta", "text": "...", "tokens": [{"id", "text", "logprob", "top": [[id, text, logprob], ...]}, "eos"?],
     "prompt": [...same, logprob null for the first prompt token...]}          # tokens / prompt only when asked
    {"type": "end", "finish_reason", "prompt_tokens", "completion_tokens", "stop_string"}
"""

from __future__ import annotations

from typing import Any

from serve_app.engine.sequence import TokenOutput, TopLogprobs


def _text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _token(tokenizer: Any, token_id: int, logprob: float | None, top: TopLogprobs) -> dict[str, Any]:
    return {"id": token_id, "text": _text(tokenizer, token_id), "logprob": logprob,
            "top": [[i, _text(tokenizer, i), lp] for i, lp in top]}  # fmt: skip


def delta(out: TokenOutput, tokenizer: Any, prompt_ids: list[int]) -> dict[str, Any] | None:
    """The delta event for one engine output, or None when it carries nothing (e.g. text held back, no logprobs)."""
    event: dict[str, Any] = {"type": "delta", "text": out.text}
    if out.logprob is not None and out.token_id is not None:
        token = _token(tokenizer, out.token_id, out.logprob, out.top_logprobs or [])
        event["tokens"] = [{**token, "eos": True} if out.eos else token]  # EOS: for LoRAX details, not OpenAI
    if out.prompt_logprobs is not None:
        event["prompt"] = [_token(tokenizer, i, lp, top) for i, (lp, top) in
                           zip(prompt_ids, out.prompt_logprobs, strict=False)]  # fmt: skip
    return event if (out.text or len(event) > 2) else None


def end(out: TokenOutput) -> dict[str, Any]:
    return {"type": "end", "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "stop_string": out.stop_string}  # fmt: skip
