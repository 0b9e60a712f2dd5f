"""LoRAX/TGI-compatible routes, what the PyPI `lorax-client` (0.6.3) sends and reads: `POST /` (dispatching on
`stream`; answers a one-element list when whole), `/generate`, `/generate_stream`. `details` carry real token ids
and logprobs (the model's raw distribution), `decoder_input_details` the prompt's, `return_k_alternatives` the
most likely alternatives; an end-of-sequence token is listed as `special` (not counted in `generated_tokens`).
Sampling follows TGI: it is on with `do_sample` or any of temperature != 1, top_k, top_p; a sampled request
without a seed gets a random one, reported in `details.seed`. `best_of` > 1 (sampling, no seed,
not streamed) generates that many in one batch and answers the one with the highest total logprob.
Refused with a 400 naming the field: `merged_adapters`, `adapter_source`, `truncate`, `typical_p`, `watermark`.

    add_routes(app, generations, base_name, error_statuses)      # called by serve_app/api.py
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app import openai_format as fmt
from serve_app.api_docs import LoraxResponse, responses
from serve_app.api_schemas import MAX_CHOICES, MAX_STOP, MAX_STOP_LEN, MAX_TEXT_CHARS, Refused, _finite, _refuse
from serve_app.errors import ApiError, error_body
from serve_app.generation import Generations, Result, check_response_format

_PARAMS = {"model": "parameters.adapter_id", "max_tokens": "parameters.max_new_tokens",
           "response_format": "parameters.response_format", "prompt": "inputs"}  # fmt: skip
FINISH = {"length": "length", "stop": "eos_token"}


class LoraxResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class LoraxParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    adapter_id: str | None = Field(None, min_length=1, max_length=256)
    api_token: str | None = Field(None, description="accepted, not used: adapters come from this server's registry")
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    return_full_text: bool = False
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]] = Field([], max_length=MAX_STOP)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(None, ge=1, le=20)
    response_format: LoraxResponseFormat | None = None
    adapter_source: Refused
    merged_adapters: Refused
    truncate: Refused
    typical_p: Refused

    _check_finite = field_validator("temperature", "top_p", "repetition_penalty")(_finite)
    _refused = field_validator("adapter_source", "merged_adapters", "truncate", "typical_p")(_refuse)

    @field_validator("watermark")
    @classmethod
    def _no_watermark(cls, value: bool) -> bool:
        if value:
            raise ValueError("not supported by this server")
        return value

    @property
    def sampling(self) -> bool:
        """TGI's rule: sample with do_sample or any sampling warper; temperature 0 means greedy."""
        if self.temperature == 0:
            return False
        return self.do_sample or self.temperature not in (None, 1.0) or bool(self.top_k) or self.top_p is not None

    @model_validator(mode="after")
    def _best_of(self) -> LoraxParameters:
        if (self.best_of or 1) > 1 and (self.seed is not None or not self.sampling):
            raise ValueError("best_of: > 1 needs sampling (do_sample) and no seed")
        if self.ignore_eos_token and self.response_format is not None:
            raise ValueError("ignore_eos_token: cannot be combined with response_format")
        return self


class LoraxRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    parameters: LoraxParameters = LoraxParameters()
    stream: bool = False

    @model_validator(mode="after")
    def _no_best_of_stream(self) -> LoraxRequest:
        if self.stream and (self.parameters.best_of or 1) > 1:
            raise ValueError("parameters.best_of: > 1 cannot be streamed")
        return self


def payload(body: LoraxRequest, want_tokens: bool) -> dict[str, Any]:
    p = body.parameters
    sampling = p.sampling
    fmt_ = p.response_format
    return {"kind": "text", "api": "lorax", "prompt": body.inputs, "max_tokens": p.max_new_tokens,
            "temperature": (p.temperature if p.temperature is not None else 1.0) if sampling else 0.0,
            "top_p": p.top_p or 1.0, "top_k": p.top_k or 0, "stop": list(p.stop),
            "seed": (p.seed if p.seed is not None else secrets.randbits(63)) if sampling else None,
            "repetition_penalty": p.repetition_penalty or 1.0, "ignore_eos": p.ignore_eos_token,
            "logprobs": (p.return_k_alternatives or 0) if want_tokens else None,
            "prompt_logprobs": 0 if p.decoder_input_details else None,
            "response_format": {"schema": fmt_.schema_} if fmt_ else None}  # fmt: skip


def lorax_error(err: ApiError) -> ApiError:
    """Errors naming LoRAX's fields (`parameters.adapter_id`, `max_new_tokens`), not OpenAI's."""
    err.param = _PARAMS.get(err.param or "", err.param)
    err.message = err.message.replace("max_tokens", "max_new_tokens")
    return err


def token(t: dict[str, Any], k: int | None, text: str | None = None) -> dict[str, Any]:
    """A LoRAX token (an end-of-sequence token is `special`); `alternative_tokens` only when asked for."""
    out = {"id": t["id"], "text": t["text"] if text is None else text, "logprob": t["logprob"],
           "special": bool(t.get("eos"))}  # fmt: skip
    if k:
        out["alternative_tokens"] = [{"id": i, "text": s, "logprob": lp} for i, s, lp in t["top"]]
    return out


def finish(result: Result) -> str:
    return "stop_sequence" if result.stop_string else FINISH.get(result.finish_reason, result.finish_reason)


def details(result: Result, body: LoraxRequest, seed: int | None) -> dict[str, Any]:
    p = body.parameters
    prefill = [{"id": t["id"], "text": t["text"], "logprob": t["logprob"]} for t in (result.prompt or [])]
    return {"finish_reason": finish(result), "prompt_tokens": result.prompt_tokens,
            "generated_tokens": result.completion_tokens, "seed": seed,
            "prefill": prefill if p.decoder_input_details else [],
            "tokens": [token(t, p.return_k_alternatives) for t in result.tokens]}  # fmt: skip


def add_routes(app: FastAPI, gen: Generations, base_name: str, errors: tuple[int, ...]) -> None:
    async def run(body: LoraxRequest) -> dict[str, Any]:
        p = body.parameters
        base = payload(body, p.details or (p.best_of or 1) > 1)
        runs = [base] + [{**base, "seed": secrets.randbits(63)} for _ in range((p.best_of or 1) - 1)]
        try:
            check_response_format(base)
            results = await gen.complete_many(runs, await gen.resolve(p.adapter_id or base_name))
        except ApiError as err:
            raise lorax_error(err) from None
        order = sorted(range(len(runs)), key=lambda i: -results[i].logprob_sum) if len(runs) > 1 else [0]
        best = results[order[0]]
        answer: dict[str, Any] = {"generated_text": (body.inputs if p.return_full_text else "") + best.text}
        if p.details:
            answer["details"] = details(best, body, runs[order[0]]["seed"])
            if len(runs) > 1:
                answer["details"]["best_of_sequences"] = [
                    {"generated_text": (body.inputs if p.return_full_text else "") + results[i].text,
                     **details(results[i], body, runs[i]["seed"])} for i in order[1:]]  # fmt: skip
        return answer

    async def stream(body: LoraxRequest) -> StreamingResponse:
        p = body.parameters
        base = payload(body, want_tokens=True)
        try:
            check_response_format(base)
            events = await gen.stream_many([base], await gen.resolve(p.adapter_id or base_name))
        except ApiError as err:
            raise lorax_error(err) from None
        return StreamingResponse(_frames(events, body, base["seed"]), media_type="text/event-stream")

    @app.post("/generate", response_model=LoraxResponse, responses=responses(*errors))
    async def generate(body: LoraxRequest) -> Any:
        return await run(body)

    @app.post("/generate_stream", response_model=None, responses=responses(*errors, stream=True))
    async def generate_stream(body: LoraxRequest) -> Any:
        return await stream(body)

    @app.post("/", response_model=None, responses=responses(*errors, stream=True, model=list[LoraxResponse]))
    async def compat_generate(body: LoraxRequest) -> Any:
        """LoRAX's root route (what lorax-client calls): a stream when `stream` is true, else a 1-element list."""
        return await stream(body) if body.stream else [await run(body)]


async def _frames(events: AsyncIterator[dict[str, Any]], body: LoraxRequest, seed: int | None) -> AsyncIterator[str]:
    """One frame per token (its text is the text the token released); the last carries generated_text + details."""
    p = body.parameters
    result, held, pending = Result(), None, ""
    try:
        async for event in events:
            if event["type"] == "delta":
                result.add(event)
                pending += event["text"]
                for t in event.get("tokens", []):
                    if held is not None:
                        yield fmt.sse(held)
                    held, pending = {"token": token(t, p.return_k_alternatives, pending), "generated_text": None,
                                     "details": None}, ""  # fmt: skip
            elif event["type"] == "error":
                yield fmt.sse({**error_body(event["status"], event["message"], event.get("param"), event.get("code")),
                               "error_type": "generation"})  # fmt: skip
                return
            elif event["type"] == "end":
                result.end(event)
                final = held or {"token": {"id": -1, "text": "", "logprob": 0.0, "special": True}}
                final["token"]["text"] += pending
                final["generated_text"] = (body.inputs if p.return_full_text else "") + result.text
                final["details"] = {"finish_reason": finish(result), "prompt_tokens": result.prompt_tokens,
                                    "generated_tokens": result.completion_tokens,
                                    "seed": seed}  # fmt: skip
                yield fmt.sse(final)
                return
    finally:
        await events.aclose()  # type: ignore[attr-defined]
