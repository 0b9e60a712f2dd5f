"""Request bodies of the HTTP API, validated by pydantic: OpenAI chat/completions and LoRAX generate.

Unknown fields are ignored (clients send `user`, `logprobs: false`, ...), but every field we use is typed and
bounded: numbers must be finite, `n` must be 1, at most MAX_STOP (16) stop strings of 1 to MAX_STOP_LEN (200)
characters (OpenAI allows 4; the detokenizer holds back up to 200 characters per stream to match them), texts
under MAX_TEXT_CHARS. A violation becomes a 400 naming the field.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 16
MAX_STOP_LEN = 200
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 200_000

StopField = Annotated[str | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]] | None, Field(None)]


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def stop_tuple(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopField
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: dict | None = None

    _check_finite = field_validator("temperature", "top_p")(_finite)

    @field_validator("stop")
    @classmethod
    def _short_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, str) and not 0 < len(stop) <= MAX_STOP_LEN:
            raise ValueError(f"a stop string must have 1 to {MAX_STOP_LEN} characters")
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: (
        Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]], Field(min_length=1, max_length=1)
        ]
    )
    max_tokens: int | None = Field(16, ge=1)

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class LoraxParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = Field(None, min_length=1, max_length=256)
    adapter_source: str | None = None
    max_new_tokens: int = Field(20, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    do_sample: bool = False
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]] = Field([], max_length=MAX_STOP)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    details: bool = False
    return_full_text: bool = False

    _check_finite = field_validator("temperature", "top_p")(_finite)


class LoraxRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    parameters: LoraxParameters = LoraxParameters()
    stream: bool = False
