"""Running generations for the HTTP routes (OpenAI and LoRAX alike): resolve a request's model to an adapter id,
start generations on the backend (errors before the first event become HTTP errors), collect them whole (`Result`)
or stream several at once (`stream_many`: n choices interleaved as their tokens come).

    gen = Generations(backend, registry, base_names)
    results = await gen.complete_many(payloads, await gen.resolve(model))
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters.registry import AdapterRegistry, IncompatibleAdapter, UnknownAdapter
from adapters.sources import RegistryUnavailable
from serve_app.engine.constraints import GrammarError, check_schema
from serve_app.errors import ApiError

Events = AsyncIterator[dict[str, Any]]


def check_response_format(payload: dict[str, Any], param: str = "response_format") -> None:
    """400 naming `param` for a JSON schema the grammar library cannot compile (before anything is queued)."""
    if payload.get("response_format"):
        try:
            check_schema(payload["response_format"]["schema"])
        except GrammarError as err:
            raise ApiError(400, str(err), param, "invalid_value") from None


class Backend(Protocol):
    def stream(self, payload: dict[str, Any], adapter_id: str | None) -> Events: ...


def event_error(event: dict[str, Any]) -> ApiError:
    return ApiError(event["status"], event["message"], event.get("param"), event.get("code"))


@dataclass
class Result:
    """One finished generation: its text, its tokens (with logprobs when asked) and how it ended."""

    text: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)
    prompt: list[dict[str, Any]] | None = None
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stop_string: bool = False

    def add(self, event: dict[str, Any]) -> None:
        self.text += event["text"]
        self.tokens += event.get("tokens", [])
        if "prompt" in event:
            self.prompt = event["prompt"]

    def end(self, event: dict[str, Any]) -> Result:
        self.finish_reason, self.stop_string = event["finish_reason"], event.get("stop_string", False)
        self.prompt_tokens, self.completion_tokens = event["prompt_tokens"], event["completion_tokens"]
        return self

    @property
    def logprob_sum(self) -> float:
        return sum(t["logprob"] for t in self.tokens if t.get("logprob") is not None)


class Generations:
    def __init__(self, backend: Backend, registry: AdapterRegistry, base_names: set[str]) -> None:
        self.backend, self.registry, self.base_names = backend, registry, base_names

    async def resolve(self, model: str) -> str | None:
        """The canonical adapter id for a request's model (None: the base model)."""
        if model in self.base_names:
            return None
        try:
            return (await asyncio.to_thread(self.registry.resolve, model)).id
        except UnknownAdapter as err:
            raise ApiError(404, str(err), "model", "model_not_found") from None
        except IncompatibleAdapter as err:
            raise ApiError(422, str(err), "model", "adapter_rejected") from None
        except RegistryUnavailable as err:
            raise ApiError(503, str(err), None, "registry_unavailable") from None

    async def start(self, payload: dict[str, Any], adapter_id: str | None) -> Events:
        """Start one generation; an error before its first event is raised as ApiError."""
        events = self.backend.stream(payload, adapter_id)
        first = await anext(events)
        if first["type"] == "error":
            await events.aclose()
            raise event_error(first)
        return events

    async def complete(self, payload: dict[str, Any], adapter_id: str | None) -> Result:
        """Run one generation to its end. One whose model replica died midway (the backend's `replica_unavailable`
        503) is run once more, since the client has seen nothing of it yet."""
        for attempt in range(2):
            try:
                return await self._collect(await self.start(payload, adapter_id))
            except ApiError as err:
                if err.code != "replica_unavailable" or attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def _collect(self, events: Events) -> Result:
        result = Result()
        try:
            async for event in events:
                if event["type"] == "delta":
                    result.add(event)
                elif event["type"] == "error":
                    raise event_error(event)
                elif event["type"] == "end":
                    return result.end(event)
        finally:
            await events.aclose()  # type: ignore[attr-defined]  (cancelled by a sibling's error: abort it now)
        raise ApiError(503, "the model replica ended the stream early")

    async def complete_many(self, payloads: list[dict[str, Any]], adapter_id: str | None) -> list[Result]:
        """Several generations together (they share the engine's batch); the first error wins."""
        tasks = [asyncio.ensure_future(self.complete(p, adapter_id)) for p in payloads]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def stream_many(self, payloads: list[dict[str, Any]], adapter_id: str | None) -> Events:
        """Start every generation (raising ApiError before anything is sent), then return one stream of their
        events, each with its `index`. Closing it aborts the generations still running."""
        streams: list[Events] = []
        try:
            for payload in payloads:
                streams.append(await self.start(payload, adapter_id))
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        return _merge(streams)


async def _merge(streams: list[Events]) -> Events:
    queue: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()

    async def pump(index: int, stream: Events) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, event = await queue.get()
            if event is None:
                running -= 1
                continue
            yield {**event, "index": index}
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()
