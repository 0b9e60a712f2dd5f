"""The HTTP API as a FastAPI app over a `Backend` (in-process, or a Ray Serve handle): OpenAI-compatible
/v1/chat/completions, /v1/completions, /v1/models; LoRAX-compatible `/`, /generate, /generate_stream
(serve_app/lorax_api.py); vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (serve_app/dynamic_adapters.py);
/health. The OpenAPI document lists every status and content type each route answers.

`create_api(backend, registry, base_name, config)` builds it. A request's `model` (or LoRAX `adapter_id`) is
resolved through the adapter registry to a canonical adapter id before anything runs: unknown -> 404, another
base's adapter -> 422, registry down -> 503. Streaming answers start only after every generation's first engine
event, so a request the engine refuses still gets a proper status code instead of a broken stream. Chat and
completions share one handler (`_openai`): n choices (and completions' best_of and several prompts) run as
separate generations batched together by the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from adapters.registry import AdapterRegistry
from adapters.sources import RegistryUnavailable
from serve_app import dynamic_adapters, lorax_api
from serve_app import openai_format as fmt
from serve_app.api_docs import ChatCompletion, Health, ModelList, TextCompletion, responses
from serve_app.api_schemas import ChatCompletionRequest, CompletionRequest
from serve_app.app_config import ServeAppConfig
from serve_app.errors import ApiError, error_body, install_error_handlers
from serve_app.generation import Backend, Generations, Result, check_response_format

__all__ = ["Backend", "create_api"]
GENERATE_ERRORS = (400, 401, 404, 413, 422, 429, 503, 504)


class _Limits:
    """Pure-ASGI middleware: body size limit (413) and optional Bearer API key (401) before any parsing."""

    def __init__(self, app: Any, max_bytes: int, api_key: str | None) -> None:
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path") != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await _reject(send, 401, "missing or invalid API key (Authorization: Bearer <key>)")
        length = headers.get("content-length")
        if length is not None:
            # ASCII digits only: str.isdigit() also accepts '²' and int() refuses over 4300 digits (both were 500s)
            if not (length.isascii() and length.isdigit()):
                return await _reject(send, 400, "invalid Content-Length header")
            digits = length.lstrip("0")
            if len(digits) > len(str(self.max_bytes)) or int(digits or "0") > self.max_bytes:
                return await _reject(send, 413, f"request body over {self.max_bytes} bytes")
        body, more = b"", True
        while more:  # buffer the body (bounded) so an oversize one is refused before parsing
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _reject(send, 413, f"request body over {self.max_bytes} bytes")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _reject(send: Any, status: int, message: str) -> None:
    response = JSONResponse(error_body(status, message), status)
    await response({"type": "http"}, None, send)


def expand(payloads: list[dict[str, Any]], copies: int) -> list[dict[str, Any]]:
    """`copies` generations of each payload; seeded ones get seed, seed+1, ... so choices differ reproducibly."""
    out = []
    for payload in payloads:
        seed = payload.get("seed")
        out += [{**payload, "seed": None if seed is None else (seed + i) % 2**63} for i in range(copies)]
    return out


def _openai_stream(events: AsyncIterator[dict[str, Any]], body: ChatCompletionRequest | CompletionRequest,
                   chat: bool, rid: str, count: int, logprobs: bool) -> AsyncIterator[str]:  # fmt: skip
    async def frames() -> AsyncIterator[str]:
        created = int(time.time())
        echo = body.prompts() if isinstance(body, CompletionRequest) and body.echo else None
        prompt_tokens, completion_tokens = [0] * count, [0] * count
        try:
            for i in range(count):
                if chat:
                    yield fmt.sse(fmt.chunk(rid, body.model, created, True, i, "", role=True))
                elif echo:
                    yield fmt.sse(fmt.chunk(rid, body.model, created, False, i, echo[i // body.n]))
            async for event in events:
                i = event["index"]
                if event["type"] == "delta":
                    tokens = event.get("tokens", [])
                    if echo and "prompt" in event:
                        tokens = event["prompt"] + tokens
                    yield fmt.sse(fmt.chunk(rid, body.model, created, chat, i, event["text"],
                                            tokens=tokens if logprobs else None))  # fmt: skip
                elif event["type"] == "error":
                    yield fmt.sse(error_body(event["status"], event["message"], event.get("param"), event.get("code")))
                    break
                elif event["type"] == "end":
                    prompt_tokens[i], completion_tokens[i] = event["prompt_tokens"], event["completion_tokens"]
                    yield fmt.sse(fmt.chunk(rid, body.model, created, chat, i, None, event["finish_reason"]))
            else:
                if body.include_usage:
                    use = fmt.usage(sum(prompt_tokens[:: body.n]), sum(completion_tokens))
                    yield fmt.sse(fmt.usage_chunk(rid, body.model, created, chat, use))
            yield fmt.sse("[DONE]")
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return frames()


def create_api(backend: Backend, registry: AdapterRegistry, base_name: str, config: ServeAppConfig) -> FastAPI:
    app = FastAPI(title="lorafleet", description="Many LoRA adapters, one endpoint.", version="0.1.0")
    install_error_handlers(app)
    app.add_middleware(_Limits, max_bytes=config.max_request_bytes, api_key=os.environ.get(config.api_key_env))
    runtime = dynamic_adapters.DynamicAdapters(registry, {base_name, config.base_model})  # + runtime-loaded names
    gen = Generations(backend, runtime, {base_name, config.base_model})

    async def _openai(body: ChatCompletionRequest | CompletionRequest, chat: bool) -> Any:
        """Chat and completions alike: one generation per (prompt, choice), answered whole or streamed."""
        payloads = body.payloads()
        check_response_format(payloads[0])
        best_of = body.best_of if isinstance(body, CompletionRequest) and body.best_of else body.n
        logprobs = bool(body.logprobs) if chat else body.logprobs is not None
        adapter_id = await gen.resolve(body.model)
        rid = fmt.new_id("chatcmpl" if chat else "cmpl")
        runs = expand(payloads, best_of)
        if body.stream:
            events = await gen.stream_many(runs, adapter_id)
            return StreamingResponse(_openai_stream(events, body, chat, rid, len(runs), logprobs),
                                     media_type="text/event-stream")  # fmt: skip
        results = await gen.complete_many(runs, adapter_id)
        choices: list[dict[str, Any]] = []
        for p, prompt in enumerate(payloads):
            group: list[Result] = results[p * best_of : (p + 1) * best_of]
            if best_of > body.n:
                group = sorted(group, key=lambda r: -r.logprob_sum)[: body.n]
            echo = prompt["prompt"] if isinstance(body, CompletionRequest) and body.echo else None
            choices += [fmt.choice(len(choices) + j, r, chat, logprobs, echo) for j, r in enumerate(group)]
        use = fmt.usage(sum(r.prompt_tokens for r in results[::best_of]), sum(r.completion_tokens for r in results))
        return fmt.completion(rid, body.model, chat, choices, use)

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, str]:
        return {"status": "ok", "base_model": base_name}

    @app.get("/v1/models", response_model=ModelList, responses=responses(401, 503))
    async def models() -> dict[str, Any]:
        try:
            refs = await asyncio.to_thread(registry.list_refs)
        except RegistryUnavailable as err:
            raise ApiError(503, str(err), None, "registry_unavailable") from None
        cards = [fmt.model_card(base_name, base_name)]
        for ref in refs:
            names = [ref.name] if ref.source == "local" else [f"{ref.name}/{ref.version}"]
            names += [ref.name if alias == "champion" else f"{ref.name}@{alias}" for alias in ref.aliases]
            cards += [
                fmt.model_card(n, base_name, base_name, {"adapter_id": ref.id, "source": ref.source}) for n in names
            ]
        return {"object": "list", "data": cards + runtime.cards(base_name)}

    @app.post("/v1/chat/completions", response_model=None,
              responses=responses(*GENERATE_ERRORS, stream=True, model=ChatCompletion))  # fmt: skip
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        return await _openai(body, chat=True)

    @app.post("/v1/completions", response_model=None,
              responses=responses(*GENERATE_ERRORS, stream=True, model=TextCompletion))  # fmt: skip
    async def completions(body: CompletionRequest) -> Any:
        return await _openai(body, chat=False)

    lorax_api.add_routes(app, gen, base_name, GENERATE_ERRORS)
    dynamic_adapters.add_routes(app, runtime, backend, config.allow_runtime_lora_updating)
    return app
