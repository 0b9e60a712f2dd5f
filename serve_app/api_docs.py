"""What the OpenAPI document (`/openapi.json`) says each route returns: response models for the JSON answers,
the error body every 4xx/5xx carries, and `responses(...)` listing every status a route can answer with its schema
and content type (text/event-stream for streams). tests/test_openapi.py runs schemathesis against it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(_Open):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(_Open):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class TextCompletion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    base_model: str


class LoraxToken(_Open):
    id: int
    text: str
    logprob: float | None
    special: bool


class LoraxDetails(_Open):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    prompt_tokens: int
    generated_tokens: int
    seed: int | None


class LoraxResponse(BaseModel):
    generated_text: str
    details: LoraxDetails | None = None


ERRORS = {
    400: "invalid request (the field is named in error.param)",
    401: "missing or wrong API key (when the server has one)",
    404: "unknown model / adapter",
    413: "request body too large",
    422: "the adapter exists but cannot be served (wrong base, bad files)",
    429: "the engine's queue is full; retry after Retry-After seconds",
    503: "the adapter registry or the model replica is unavailable",
    504: "the generation ran past the server's per-request deadline",
}
# Before OpenAPI 3.2 an event stream's `schema` describes each event: `data: <JSON chunk or error body, or [DONE]>`
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk, a JSON error body, or [DONE]"},
                   "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}},
}  # fmt: skip
SSE = {"text/event-stream": {"schema": SSE_EVENT}}


def responses(*statuses: int, stream: bool = False, model: type[BaseModel] | None = None) -> dict[int | str, Any]:
    """The `responses=` of a route: 200 (JSON `model`, and/or an event stream) and the listed error statuses."""
    out: dict[int | str, Any] = {}
    if stream:
        out[200] = {"description": "the answer (JSON), or a stream of events when `stream` is true",
                    "content": dict(SSE)}  # fmt: skip
        if model is not None:
            out[200]["model"] = model
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": ERRORS[status]}
    return out
