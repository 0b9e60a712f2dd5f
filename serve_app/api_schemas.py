"""Request bodies of the OpenAI-compatible API (chat and completions), validated by pydantic.

Every field of OpenAI's request schemas is either honoured, accepted where it cannot change the answer (`user`,
`metadata`, `service_tier`, ...), or refused with a 400 naming it (`tools`, `audio`, `suffix`, ...); fields OpenAI
does not define are refused too (extra="forbid"), except the vLLM-style extensions honoured here (`top_k`,
`repetition_penalty`, `ignore_eos`). Numbers must be finite; at most MAX_STOP (16) stop strings of 1 to
MAX_STOP_LEN (200) characters (the detokenizer holds back up to 200 characters per stream to match them).
`payload()` turns a request into the engine payload (serve_app/model_service.py).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 16
MAX_STOP_LEN = 200
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 200_000
MAX_CHOICES = 16  # n (and best_of): generations run together in the batch, one per choice
MAX_LOGIT_BIAS = 300

StopField = Annotated[str | list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]] | None, Field(None)]
Refused = Annotated[Any, Field(None, description="not supported: must be absent or null (else 400)")]


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _refuse(value: Any) -> Any:
    if value is not None:
        raise ValueError("not supported by this server (omit it or send null)")
    return value


def stop_tuple(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: 0 is not false, "1" not 1 (as the schema says)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self

    def engine_format(self) -> dict[str, Any] | None:
        """The engine's `response_format` payload: None (free text) or {"schema": a JSON schema or None}."""
        if self.type == "text":
            return None
        return {"schema": self.json_schema.schema_ if self.json_schema else None}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopField
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices to generate (batched together)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: (
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None
    ) = Field(None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, max_length=256, description="accepted; not used")
    top_k: int = Field(0, ge=-1, le=1_000_000, description="extension: keep the k most likely tokens (0/-1: off)")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension: CTRL repetition penalty")
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence tokens")

    _check_finite = field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                    "repetition_penalty")(_finite)  # fmt: skip

    @field_validator("stop")
    @classmethod
    def _short_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, str) and not 0 < len(stop) <= MAX_STOP_LEN:
            raise ValueError(f"a stop string must have 1 to {MAX_STOP_LEN} characters")
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return stop

    @model_validator(mode="after")
    def _stream_only_options(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        if self.ignore_eos and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("ignore_eos: cannot be combined with a JSON response_format (JSON ends with EOS)")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict[str, Any]:
        """The engine payload's sampling fields (logprobs are added by the caller)."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": list(stop_tuple(self.stop)), "seed": self.seed, "top_k": max(self.top_k, 0),
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "repetition_penalty": self.repetition_penalty, "logit_bias": self.logit_bias,
                "ignore_eos": self.ignore_eos,
                "response_format": self.response_format.engine_format() if self.response_format else None}  # fmt: skip


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | list[TextPart]
    name: Refused
    tool_calls: Refused
    function_call: Refused
    refusal: Refused
    audio: Refused

    _refused = field_validator("name", "tool_calls", "function_call", "refusal", "audio")(_refuse)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool | None = Field(None, description="accepted; there are no tools")
    tool_choice: Literal["none"] | None = Field(None, description="only 'none' (tools are not supported)")
    modalities: list[Literal["text"]] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, description="accepted; not used")
    store: Literal[False] | None = Field(None, description="completions are never stored")
    service_tier: Literal["auto", "default"] | None = Field(None, description="accepted; one tier")
    safety_identifier: str | None = Field(None, max_length=256, description="accepted; not used")
    prompt_cache_key: str | None = Field(None, max_length=256, description="accepted; not used")
    tools: Refused
    functions: Refused
    function_call: Refused
    audio: Refused
    prediction: Refused
    reasoning_effort: Refused
    verbosity: Refused
    web_search_options: Refused

    _refused = field_validator("tools", "functions", "function_call", "audio", "prediction", "reasoning_effort",
                               "verbosity", "web_search_options")(_refuse)  # fmt: skip

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def payloads(self) -> list[dict[str, Any]]:
        """One engine payload per prompt (chat: one)."""
        top = (self.top_logprobs or 0) if self.logprobs else None
        return [{"kind": "chat", "messages": self.chat(), **self.sampling(), "logprobs": top}]


PromptText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class CompletionRequest(_Request):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_CHOICES)]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="generate this many, return the n best")
    suffix: Refused

    _refused = field_validator("suffix")(_refuse)

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of: must be >= n")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of: cannot be combined with stream")
        if len(self.prompts()) * max(self.n, self.best_of or 1) > MAX_CHOICES:
            raise ValueError(f"n (or best_of) times the number of prompts must be at most {MAX_CHOICES}")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def payloads(self) -> list[dict[str, Any]]:
        ranked = self.best_of is not None and self.best_of > self.n
        logprobs = self.logprobs if self.logprobs is not None else (0 if ranked else None)
        prompt_logprobs = self.logprobs if (self.echo and self.logprobs is not None) else None
        return [{"kind": "text", "prompt": p, **self.sampling(), "logprobs": logprobs,
                 "prompt_logprobs": prompt_logprobs} for p in self.prompts()]  # fmt: skip
