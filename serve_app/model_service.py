"""ModelService: what one model replica does, in plain Python (no Ray): hold the engine, turn request payloads into
token ids, load adapters by canonical id from the registry, and stream events back.

A payload is a plain dict (it crosses Ray's process boundary): `{"kind": "chat", "messages": [...]}` or
`{"kind": "text", "prompt": "..."}`, plus sampling fields (`SamplingParams.from_payload`).
`generate` yields event dicts: `start` (prompt tokens), `delta` (text), `end` (finish reason, usage) — or a single
`error` event with an HTTP status, so a caller can answer before it starts streaming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from adapters.lora_files import AdapterRejected
from adapters.prompt_format import PromptFormat, PromptFormatError, read_prompt_format
from adapters.registry import AdapterRegistry, UnknownAdapter
from adapters.sources import RegistryUnavailable
from serve_app import prompting, token_events
from serve_app.app_config import ServeAppConfig
from serve_app.engine.async_engine import AsyncLoraEngine
from serve_app.engine.engine import LoraEngine, RequestRejected
from serve_app.engine.sequence import SamplingParams
from serve_app.metrics import Metrics, NullMetrics

log = logging.getLogger(__name__)


def error_event(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"type": "error", "status": status, "message": message, "param": param, "code": code}


class ModelService:
    def __init__(
        self,
        config: ServeAppConfig,
        engine: LoraEngine | None = None,
        registry: AdapterRegistry | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        engine = engine or LoraEngine.from_base_ref(config.base_model, config.engine, config.quantization)
        self.engine = AsyncLoraEngine(engine)
        self.tokenizer = engine.tokenizer
        self.base_name = engine.base.name
        self.max_seq_len = engine.max_seq_len
        self.registry = registry or config.build_registry(self.base_name)
        self.metrics = metrics or NullMetrics()
        self._load_locks: dict[str, asyncio.Lock] = {}
        # Canonical ids are immutable (registry version / content stamp), so a rejected adapter stays rejected: keep
        # the reason instead of re-reading its files for every request (and for Serve's multiplex load, then ours).
        self._rejected: OrderedDict[str, str] = OrderedDict()
        # How each adapter was trained to be asked (adapters/prompt_format.py); ids are immutable, so kept past evictions
        self._prompts: OrderedDict[str, PromptFormat | None] = OrderedDict()

    def info(self) -> dict[str, Any]:
        engine = self.engine.engine
        return {"base_model": self.base_name, "max_seq_len": self.max_seq_len,
                "max_lora_rank": engine.config.max_lora_rank, "device": str(engine.device)}  # fmt: skip

    # -- adapters ---------------------------------------------------------------------------------------------
    async def load_adapter(self, adapter_id: str) -> None:
        """Fetch (once) and validate an adapter by canonical id. Raises AdapterRejected / UnknownAdapter."""
        lock = self._load_locks.setdefault(adapter_id, asyncio.Lock())
        async with lock:
            if adapter_id in self._rejected:
                raise AdapterRejected(self._rejected[adapter_id])
            if adapter_id in self.engine.engine.adapters:
                return
            ref = await asyncio.to_thread(self.registry.ref_for_id, adapter_id)
            folder = await asyncio.to_thread(self.registry.fetch, ref)
            try:
                try:
                    self._prompts[adapter_id] = await asyncio.to_thread(read_prompt_format, folder)
                except PromptFormatError as err:
                    raise AdapterRejected(str(err)) from None
                while len(self._prompts) > 4096:
                    self._prompts.popitem(last=False)
                await self.engine.load_adapter(adapter_id, folder)
            except AdapterRejected as err:
                self._rejected[adapter_id] = str(err)
                while len(self._rejected) > 256:
                    self._rejected.popitem(last=False)
                self._load_locks.pop(adapter_id, None)
                self.metrics.adapter_event(adapter_id, "rejected")
                raise
            self.metrics.adapter_event(adapter_id, "load")
            log.info("loaded adapter %s from %s", adapter_id, folder)

    async def try_load(self, adapter_id: str) -> dict[str, Any] | None:
        """Load an adapter; on failure, the error event for the request."""
        try:
            await self.load_adapter(adapter_id)
        except AdapterRejected as err:
            return error_event(422, f"adapter {adapter_id} cannot be served: {err}", "model", "adapter_rejected")
        except UnknownAdapter as err:
            return error_event(404, str(err), "model", "model_not_found")
        except RegistryUnavailable as err:
            return error_event(503, str(err), None, "registry_unavailable")
        return None

    def unload_adapter(self, adapter_id: str) -> None:
        self.engine.unload_adapter(adapter_id)
        self._load_locks.pop(adapter_id, None)
        self.metrics.adapter_event(adapter_id, "evict")

    # -- requests ---------------------------------------------------------------------------------------------
    def encode(self, payload: dict[str, Any], adapter_id: str | None = None) -> list[int]:
        """Prompt token ids, asked the way the adapter was trained (serve_app/prompting.py)."""
        fmt = self._prompts.get(adapter_id) if adapter_id else None
        return prompting.prompt_ids(self.tokenizer, payload, fmt, self.config.apply_trained_prompt,
                                    self.config.template_lorax_chat)  # fmt: skip

    def sampling_params(self, payload: dict[str, Any], prompt_len: int) -> SamplingParams:
        max_tokens = payload.get("max_tokens")
        if max_tokens is None:
            max_tokens = max(1, min(self.config.default_max_tokens, self.max_seq_len - prompt_len))
        return SamplingParams.from_payload(payload, max_tokens, self.config.request_timeout_s)

    async def generate(self, payload: dict[str, Any], adapter_id: str | None) -> AsyncIterator[dict[str, Any]]:
        label = adapter_id or "base"
        started = time.monotonic()
        prompt_ids: list[int] | None = None
        for attempt in range(3):
            if adapter_id:
                failure = await self.try_load(adapter_id)
                if failure:
                    self.metrics.request(label, str(failure["status"]))
                    yield failure
                    return
            if prompt_ids is None:  # after the load: the adapter's prompt format decides the template
                prompt_ids = await asyncio.to_thread(self.encode, payload, adapter_id)
                params = self.sampling_params(payload, len(prompt_ids))
            stream = self.engine.generate(prompt_ids, params, adapter_id)
            try:
                first = await anext(stream)
                break
            except RequestRejected as err:
                if err.status == 404 and adapter_id and attempt < 2:
                    continue  # evicted by the LRU between loading and submitting: load it again
                self.metrics.request(label, str(err.status))
                code = "context_length_exceeded" if "context limit" in str(err) else None
                yield error_event(err.status, str(err), err.param, code)
                return
        self.metrics.ttft(label, time.monotonic() - started)
        yield {"type": "start", "prompt_tokens": len(prompt_ids)}
        out = first
        while True:
            if out.error:
                self.metrics.request(label, "error")
                yield error_event(out.error_status, out.error, None, out.error_code)
                return
            if event := token_events.delta(out, self.tokenizer, prompt_ids):
                yield event
            if out.finished:
                break
            out = await anext(stream)
        self.metrics.request(label, "ok")
        self.metrics.tokens(label, out.prompt_tokens, out.completion_tokens)
        self.metrics.latency(label, time.monotonic() - started)
        yield token_events.end(out)


class LocalBackend:
    """Run the service in-process with its own LRU of loaded adapters (what Serve multiplexing does across
    replicas). Used by tests and by `python -m serve_app.local_server`."""

    def __init__(self, service: ModelService, max_adapters: int) -> None:
        self.service = service
        self.max_adapters = max_adapters
        self._lru: OrderedDict[str, None] = OrderedDict()

    def _use(self, adapter_id: str) -> None:
        self._lru[adapter_id] = None
        self._lru.move_to_end(adapter_id)
        while len(self._lru) > self.max_adapters:
            victim, _ = self._lru.popitem(last=False)
            self.service.unload_adapter(victim)

    async def stream(self, payload: dict[str, Any], adapter_id: str | None) -> AsyncIterator[dict[str, Any]]:
        if adapter_id:
            self._use(adapter_id)
        async for event in self.service.generate(payload, adapter_id):
            yield event

    async def check_adapter(self, adapter_id: str) -> dict[str, Any] | None:
        """Load an adapter now, as a request for it would (POST /v1/load_lora_adapter): None, or the error event."""
        self._use(adapter_id)
        return await self.service.try_load(adapter_id)
