"""Response objects in the shapes OpenAI and LoRAX clients parse: chat.completion(.chunk), text_completion,
LoRAX generate / generate_stream, and the SSE framing (`data: {...}\\n\\n`, ending with `data: [DONE]`)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj: Any) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(rid: str, model: str, text: str, finish: str | None, prompt: int, completion: int) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage(prompt, completion),
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def text_completion(rid: str, model: str, text: str, finish: str | None, prompt: int, completion: int) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        "usage": usage(prompt, completion),
    }


def text_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt: int, completion: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt, completion)}  # fmt: skip


LORAX_FINISH = {"length": "length", "stop": "eos_token"}


def lorax_details(end: dict, seed: int | None) -> dict:
    return {"finish_reason": LORAX_FINISH.get(end["finish_reason"], end["finish_reason"]),
            "prompt_tokens": end["prompt_tokens"], "generated_tokens": end["completion_tokens"], "seed": seed}  # fmt: skip


def lorax_token(text: str, index: int) -> dict:
    return {"token": {"id": index, "text": text, "logprob": None, "special": False}, "generated_text": None,
            "details": None}  # fmt: skip


def model_card(model_id: str, root: str, parent: str | None = None, meta: dict | None = None) -> dict:
    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "lorafleet", "root": root, "parent": parent}
    if meta:
        card["lorafleet"] = meta
    return card
