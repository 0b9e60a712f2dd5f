"""The HTTP API as a FastAPI app over a `Backend` (in-process, or a Ray Serve handle): OpenAI-compatible
/v1/chat/completions, /v1/completions, /v1/models; LoRAX-compatible /generate, /generate_stream; /health.

`create_api(backend, registry, base_name, config)` builds it. A request's `model` (or LoRAX `adapter_id`) is
resolved through the adapter registry to a canonical adapter id before anything runs: unknown -> 404, another
base's adapter -> 422, registry down -> 503. Streaming answers start only after the first engine event, so a
request the engine refuses still gets a proper status code instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from adapters.registry import AdapterRegistry, IncompatibleAdapter, UnknownAdapter
from adapters.sources import RegistryUnavailable
from serve_app import openai_format as fmt
from serve_app.api_schemas import ChatCompletionRequest, CompletionRequest, LoraxRequest, stop_tuple
from serve_app.app_config import ServeAppConfig
from serve_app.errors import ApiError, error_body, install_error_handlers

_LORAX_PARAMS = {"model": "parameters.adapter_id", "max_tokens": "parameters.max_new_tokens"}


class Backend(Protocol):
    def stream(self, payload: dict[str, Any], adapter_id: str | None) -> AsyncIterator[dict[str, Any]]: ...


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


def create_api(backend: Backend, registry: AdapterRegistry, base_name: str, config: ServeAppConfig) -> FastAPI:
    app = FastAPI(title="lorafleet", description="Many LoRA adapters, one endpoint.", version="0.1.0")
    install_error_handlers(app)
    app.add_middleware(_Limits, max_bytes=config.max_request_bytes, api_key=os.environ.get(config.api_key_env))
    base_names = {base_name, config.base_model}

    async def resolve(model: str) -> str | None:
        if model in base_names:
            return None
        try:
            return (await asyncio.to_thread(registry.resolve, model)).id
        except UnknownAdapter as err:
            raise ApiError(404, str(err), "model", "model_not_found") from None
        except IncompatibleAdapter as err:
            raise ApiError(422, str(err), "model", "adapter_rejected") from None
        except RegistryUnavailable as err:
            raise ApiError(503, str(err), None, "registry_unavailable") from None

    async def start(payload: dict[str, Any], model: str) -> tuple[AsyncIterator[dict[str, Any]], dict[str, Any]]:
        events = backend.stream(payload, await resolve(model))
        first = await anext(events)
        if first["type"] == "error":
            raise ApiError(first["status"], first["message"], first.get("param"), first.get("code"))
        return events, first

    async def complete(payload: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
        """`start` + `collect` for answers sent whole: a generation whose model replica died midway (the backend's
        `replica_unavailable` 503) is run once more, since the client has seen nothing of it yet."""
        for attempt in range(2):
            try:
                return await collect((await start(payload, model))[0])
            except ApiError as err:
                if err.code != "replica_unavailable" or attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def collect(events: AsyncIterator[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        parts: list[str] = []
        async for event in events:
            if event["type"] == "delta":
                parts.append(event["text"])
            elif event["type"] == "error":
                raise ApiError(event["status"], event["message"], event.get("param"), event.get("code"))
            elif event["type"] == "end":
                return "".join(parts), event
        raise ApiError(503, "the model replica ended the stream early")

    def sampling(body: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        return {"max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                "stop": list(stop_tuple(body.stop)), "seed": body.seed}  # fmt: skip

    async def openai_stream(events: AsyncIterator[dict[str, Any]], rid: str, model: str, chat: bool,
                            include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            yield fmt.sse(fmt.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
        async for event in events:
            if event["type"] == "delta":
                chunk = (fmt.chat_chunk(rid, model, created, {"content": event["text"]}) if chat
                         else fmt.text_chunk(rid, model, created, event["text"]))  # fmt: skip
                yield fmt.sse(chunk)
            elif event["type"] == "error":
                yield fmt.sse(error_body(event["status"], event["message"], event.get("param"), event.get("code")))
                break
            elif event["type"] == "end":
                finish = event["finish_reason"]
                yield fmt.sse(fmt.chat_chunk(rid, model, created, {}, finish) if chat
                              else fmt.text_chunk(rid, model, created, "", finish))  # fmt: skip
                if include_usage:
                    yield fmt.sse(fmt.usage_chunk(rid, model, created, obj, event["prompt_tokens"],
                                                  event["completion_tokens"]))  # fmt: skip
                break
        yield fmt.sse("[DONE]")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "base_model": base_name}

    @app.get("/v1/models")
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
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        payload = {"kind": "chat", "messages": body.chat(), **sampling(body)}
        rid = fmt.new_id("chatcmpl")
        if body.stream:
            events, _ = await start(payload, body.model)
            return StreamingResponse(openai_stream(events, rid, body.model, True, body.include_usage),
                                     media_type="text/event-stream")  # fmt: skip
        text, end = await complete(payload, body.model)
        return fmt.chat_completion(rid, body.model, text, end["finish_reason"], end["prompt_tokens"],
                                   end["completion_tokens"])  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        payload = {"kind": "text", "prompt": body.text(), **sampling(body)}
        rid = fmt.new_id("cmpl")
        if body.stream:
            events, _ = await start(payload, body.model)
            return StreamingResponse(openai_stream(events, rid, body.model, False, body.include_usage),
                                     media_type="text/event-stream")  # fmt: skip
        text, end = await complete(payload, body.model)
        return fmt.text_completion(rid, body.model, text, end["finish_reason"], end["prompt_tokens"],
                                   end["completion_tokens"])  # fmt: skip

    def lorax_payload(body: LoraxRequest) -> tuple[dict[str, Any], str]:
        p = body.parameters
        temperature = (p.temperature if p.temperature is not None else 1.0) if p.do_sample else 0.0
        payload = {"kind": "text", "prompt": body.inputs, "max_tokens": p.max_new_tokens, "temperature": temperature,
                   "top_p": p.top_p or 1.0, "stop": list(p.stop), "seed": p.seed}  # fmt: skip
        return payload, p.adapter_id or base_name

    def lorax_error(err: ApiError) -> ApiError:
        """Errors naming LoRAX's fields (`parameters.adapter_id`, `max_new_tokens`), not OpenAI's."""
        err.param = _LORAX_PARAMS.get(err.param or "", err.param)
        err.message = err.message.replace("max_tokens", "max_new_tokens")
        return err

    async def lorax_start(body: LoraxRequest) -> AsyncIterator[dict[str, Any]]:
        try:
            return (await start(*lorax_payload(body)))[0]
        except ApiError as err:
            raise lorax_error(err) from None

    @app.post("/generate")
    async def generate(body: LoraxRequest) -> Any:
        try:
            text, end = await complete(*lorax_payload(body))
        except ApiError as err:
            raise lorax_error(err) from None
        result: dict[str, Any] = {"generated_text": (body.inputs + text) if body.parameters.return_full_text else text}
        if body.parameters.details:
            result["details"] = fmt.lorax_details(end, body.parameters.seed)
        return result

    @app.post("/generate_stream")
    async def generate_stream(body: LoraxRequest) -> Any:
        events = await lorax_start(body)

        async def frames() -> AsyncIterator[str]:
            parts: list[str] = []
            async for event in events:
                if event["type"] == "delta":
                    parts.append(event["text"])
                    yield fmt.sse(fmt.lorax_token(event["text"], len(parts)))
                elif event["type"] == "error":
                    yield fmt.sse(error_body(event["status"], event["message"]))
                    return
                elif event["type"] == "end":
                    final = fmt.lorax_token("", len(parts) + 1)
                    final["generated_text"] = "".join(parts)
                    final["details"] = fmt.lorax_details(event, body.parameters.seed)
                    yield fmt.sse(final)
                    return

        return StreamingResponse(frames(), media_type="text/event-stream")

    return app
