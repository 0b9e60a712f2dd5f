"""Response objects in the shapes OpenAI clients parse: chat.completion(.chunk) and text_completion (one builder for
both, `chat` says which), their `logprobs` objects, and the SSE framing (`data: {...}\\n\\n`, ending with
`data: [DONE]`). Tokens are the model replica's token dicts (serve_app/token_events.py)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from serve_app.generation import Result


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj: Any) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """`choices[].logprobs` of chat: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    content = [{"token": t["text"], "logprob": t["logprob"], "bytes": _bytes(t["text"]),
                "top_logprobs": [{"token": s, "logprob": lp, "bytes": _bytes(s)} for _, s, lp in t["top"]]}
               for t in tokens if not t.get("eos")]  # fmt: skip
    return {"content": content, "refusal": None}


def text_logprobs(tokens: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of completions: parallel lists of tokens, logprobs, top-k dicts, text offsets."""
    tokens = [t for t in tokens if not t.get("eos")]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t["text"])
    return {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{s: lp for _, s, lp in t["top"]} if t["logprob"] is not None else None
                             for t in tokens],
            "text_offset": offsets}  # fmt: skip


def choice(index: int, result: Result, chat: bool, logprobs: bool, echo: str | None = None) -> dict[str, Any]:
    """One choice of a whole answer; `echo` (completions): the prompt, put before the text (and its tokens)."""
    finish = result.finish_reason
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": result.text, "refusal": None},
                "finish_reason": finish, "logprobs": chat_logprobs(result.tokens) if logprobs else None}  # fmt: skip
    tokens = (result.prompt or []) + result.tokens if echo is not None else result.tokens
    text = (echo or "") + result.text
    return {"index": index, "text": text, "finish_reason": finish,
            "logprobs": text_logprobs(tokens) if logprobs else None}  # fmt: skip


def completion(rid: str, model: str, chat: bool, choices: list[dict[str, Any]], use: dict[str, int]) -> dict:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": use}  # fmt: skip


def chunk(rid: str, model: str, created: int, chat: bool, index: int, text: str | None, finish: str | None = None,
          tokens: list[dict[str, Any]] | None = None, role: bool = False) -> dict:  # fmt: skip
    """One streamed chunk of one choice (text None: no content, e.g. the final chunk)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        body: dict[str, Any] = {"index": index, "delta": delta}
        logprobs = chat_logprobs(tokens) if tokens is not None else None
    else:
        body = {"index": index, "text": text or ""}
        logprobs = text_logprobs(tokens) if tokens is not None else None
    body.update(finish_reason=finish, logprobs=logprobs)
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [body]}  # fmt: skip


def usage_chunk(rid: str, model: str, created: int, chat: bool, use: dict[str, int]) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": use}  # fmt: skip


def model_card(model_id: str, root: str, parent: str | None = None, meta: dict | None = None) -> dict:
    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "lorafleet", "root": root, "parent": parent}
    if meta:
        card["lorafleet"] = meta
    return card
