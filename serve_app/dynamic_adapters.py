"""Adapter names loaded and unloaded at run time: vLLM's `POST /v1/load_lora_adapter` (`{"lora_name", "lora_path"}`)
and `POST /v1/unload_lora_adapter` (`{"lora_name"}`), answered like vLLM (200, plain text "Success: ...") with
OpenAI-shaped 4xx errors. Off unless the serve config sets `allow_runtime_lora_updating: true` (vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING); then the routes answer 404. Both sit behind the API's Bearer key like every route.

    curl -X POST localhost:8000/v1/load_lora_adapter -H 'content-type: application/json' \
         -d '{"lora_name": "support-bot", "lora_path": "models:/sentiment@champion"}'
    curl -X POST localhost:8000/v1/unload_lora_adapter -d '{"lora_name": "support-bot"}' -H 'content-type: ...'

`lora_path` is never a filesystem path or an arbitrary URL: it is an adapter id the server's registry already
resolves with its own safety rules (adapters/registry.py: MLflow `name`, `name@alias`, `name/N`, `models:/name@alias`
or `models:/name/N`; a catalog entry; an allowed Hub repo `org/name` (`hub_adapters`); a folder directly under an
allowed store prefix (`adapter_store_prefixes`)). Anything else is a 400 saying why. The id is resolved once, at load
time, to its canonical id (an alias is pinned to the version it names then) and the adapter is loaded the normal way
on a model replica, so a corrupt adapter or one with another base / too high a rank is refused (422) before the
name exists.

Where the names live: every `model` -> adapter resolution happens in the API layer (the Ingress deployment under Ray
Serve); model replicas only ever get canonical ids (`mlflow:sentiment/3`), which each replica loads from its own
registry. So the names are kept here, in `DynamicAdapters`, which wraps the registry the routes resolve through:
a loaded name is listed by `/v1/models` and servable on every model replica; once unloaded, no new request can use
it (404), while generations already running hold the canonical id and finish; the replicas drop the weights through
their usual LRU. The names live in the one Ingress replica's memory (config.yaml keeps Ingress at one replica) and,
as in vLLM, are gone when it restarts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters.registry import AdapterRegistry, IncompatibleAdapter, UnknownAdapter
from adapters.sources import NAME_RE, AdapterRef, RegistryUnavailable, parse_model
from adapters.sources.hf_hub import HubSource, parse_hub_id
from adapters.sources.object_store import ObjectStoreSource
from serve_app import openai_format as fmt
from serve_app.api_docs import ErrorResponse
from serve_app.errors import ApiError

MLFLOW_URI = "models:/"
ID_FORMS = ("an MLflow registry name, name@alias, name/N, models:/name@alias or models:/name/N; a local catalog "
            "entry; an allowed Hub repo (hub_adapters); or a folder under adapter_store_prefixes")  # fmt: skip
MAX_NAMES = 1024  # runtime-loaded names at once (each is a /v1/models entry)
DISABLED = "runtime LoRA adapter loading is disabled on this server (serve config: allow_runtime_lora_updating)"


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body for POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(pattern=NAME_RE.pattern, description="the name requests will use as `model`")
    lora_path: str = Field(min_length=1, max_length=1024, description=f"the adapter: {ID_FORMS}; never a path")
    load_inplace: bool = Field(False, description="replace the adapter of a name that is already loaded")


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's body for POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = Field(None, description="accepted for vLLM clients; the name is the key")


class AdapterChecker(Protocol):
    async def check_adapter(self, adapter_id: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    path: str  # lora_path as the client gave it
    ref: AdapterRef  # what it resolved to at load time (canonical id pinned)


class DynamicAdapters:
    """The registry the HTTP routes resolve through: runtime-loaded names first, then the adapter registry."""

    def __init__(self, registry: AdapterRegistry, base_names: set[str]) -> None:
        self.registry, self.base_names = registry, base_names
        self._names: dict[str, LoadedAdapter] = {}  # replaced, never mutated: readers in threads see a whole dict
        self._lock = asyncio.Lock()

    def resolve(self, model: str) -> AdapterRef:
        loaded = self._names.get(model)
        return loaded.ref if loaded else self.registry.resolve(model)

    def list_refs(self) -> list[AdapterRef]:
        return self.registry.list_refs()

    def loaded(self) -> list[LoadedAdapter]:
        return list(self._names.values())

    def cards(self, base_name: str) -> list[dict[str, Any]]:
        """`/v1/models` entries (vLLM's shape: `root` is the lora_path, `parent` the base)."""
        return [fmt.model_card(a.name, a.path, base_name, {"adapter_id": a.ref.id, "source": a.ref.source,
                                                          "runtime_loaded": True}) for a in self.loaded()]  # fmt: skip

    async def load(self, body: LoadLoraAdapterRequest, checker: AdapterChecker) -> None:
        """Resolve and validate `lora_path`, then add the name; ApiError (4xx/503) says why not."""
        name = body.lora_name
        async with self._lock:
            if name in self.base_names:
                raise ApiError(409, f"lora_name '{name}' is the base model's name", "lora_name", "name_conflict")
            if name in self._names and not body.load_inplace:
                raise ApiError(400, f"The lora adapter '{name}' has already been loaded (unload it first, or send "
                               "load_inplace: true)", "lora_name", "adapter_already_loaded")  # fmt: skip
            if name not in self._names:
                if len(self._names) >= MAX_NAMES:
                    raise ApiError(400, f"at most {MAX_NAMES} adapters can be loaded at run time; unload one first",
                                   "lora_name", "too_many_adapters")  # fmt: skip
                await self._check_free(name)
            ref = await self._resolve_path(body.lora_path)
            try:
                failure = await checker.check_adapter(ref.id)
            except Exception as err:  # the model replica died or cannot be reached
                raise ApiError(503, f"no model replica could load the adapter: {type(err).__name__}", None,
                               "replica_unavailable") from None  # fmt: skip
            if failure is not None:
                raise ApiError(failure["status"], f"lora_path '{body.lora_path}': {failure['message']}",
                               "lora_path", failure.get("code"))  # fmt: skip
            self._names = {**self._names, name: LoadedAdapter(name, body.lora_path, ref)}

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self._names:
                raise ApiError(404, f"The lora adapter '{name}' cannot be found (only adapters loaded with "
                               "/v1/load_lora_adapter can be unloaded)", "lora_name", "model_not_found")  # fmt: skip
            self._names = {k: v for k, v in self._names.items() if k != name}

    async def _check_free(self, name: str) -> None:
        """409 when `name` already means an adapter of the registry (the name would hide it)."""
        try:
            ref = await asyncio.to_thread(self.registry.resolve, name)
        except UnknownAdapter:
            return
        except IncompatibleAdapter:
            ref = None
        except RegistryUnavailable as err:
            raise ApiError(503, f"cannot check lora_name against the registry: {err}", None,
                           "registry_unavailable") from None  # fmt: skip
        source = f" ({ref.source}: {ref.id})" if ref else ""
        raise ApiError(409, f"lora_name '{name}' already names a registry adapter{source}; choose another name",
                       "lora_name", "name_conflict")  # fmt: skip

    async def _resolve_path(self, path: str) -> AdapterRef:
        model = source_model(path, self.registry)
        if model in self.base_names:
            raise ApiError(400, f"lora_path '{path}' names the base model, not an adapter", "lora_path",
                           "invalid_value")  # fmt: skip
        try:
            return await asyncio.to_thread(self.registry.resolve, model)
        except UnknownAdapter as err:
            raise ApiError(404, f"lora_path '{path}': {err}", "lora_path", "model_not_found") from None
        except IncompatibleAdapter as err:
            raise ApiError(422, f"lora_path '{path}': {err}", "lora_path", "adapter_rejected") from None
        except RegistryUnavailable as err:
            raise ApiError(503, str(err), None, "registry_unavailable") from None


def source_model(path: str, registry: AdapterRegistry) -> str:
    """The registry `model` string a lora_path names; ApiError 400 naming why for a path, a URL outside the allowed
    store prefixes, a Hub repo that is not allowed, or anything else that is no adapter id."""
    sources = registry.sources
    stores = [s for s in sources if isinstance(s, ObjectStoreSource)]
    hubs = [s for s in sources if isinstance(s, HubSource)]
    if path.startswith(MLFLOW_URI):
        rest = path.removeprefix(MLFLOW_URI)
        parts = parse_model(rest)
        if parts is None or not (parts["alias"] or parts["version"]):
            raise _bad(path, "an MLflow model URI must be models:/<name>@<alias> or models:/<name>/<version>")
        return rest
    if any(s.split(path) for s in stores):
        return path
    if "://" in path or path.startswith("file:"):
        allowed = [p for s in stores for p in s.prefixes]
        raise _bad(path, "a URL outside the allowed adapter store prefixes (adapter_store_prefixes: "
                   f"{allowed or 'none'}); only an adapter folder directly under one of them can be loaded")  # fmt: skip
    if parse_model(path) is not None:
        return path
    if parse_hub_id(path) is not None:
        if any(s.resolve(path) for s in hubs):
            return path
        allowed = [p for s in hubs for p in s.allowed]
        raise _bad(path, f"a Hugging Face Hub repo this server does not allow (hub_adapters: {allowed or 'none'})")
    if path.startswith(("/", ".", "~", "\\")) or "/" in path or "\\" in path or ":" in path:
        raise _bad(path, "a filesystem path; adapters are loaded only by registry or source id, never from a path "
                   "the client supplies")  # fmt: skip
    raise _bad(path, "not an adapter id")


def _bad(path: str, why: str) -> ApiError:
    return ApiError(400, f"lora_path '{path[:200]}' is {why}. Expected {ID_FORMS}.", "lora_path", "invalid_value")


ERROR_SCHEMA = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}  # registered by the API's other routes


def _docs(success: str) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {
        200: {"description": success, "content": {"text/plain": {"schema": {"type": "string"}}}}
    }
    for status, what in {400: "invalid body, invalid lora_path (a path, a URL outside the allowed prefixes), or the "
                              "name is already loaded",
                         401: "missing or wrong API key (when the server has one)",
                         404: "unknown adapter or name, or runtime loading is disabled",
                         409: "lora_name is the base model's or a registry adapter's name",
                         413: "request body too large",
                         422: "the adapter exists but cannot be served (wrong base, bad files, rank too high)",
                         503: "the adapter registry or the model replicas are unavailable"}.items():  # fmt: skip
        out[status] = {"description": what, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    return out


def add_routes(app: FastAPI, adapters: DynamicAdapters, checker: AdapterChecker, enabled: bool) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (404 while `enabled` is false)."""

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
              responses=_docs("the adapter is loaded (vLLM's plain-text answer)"))  # fmt: skip
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
        if not enabled:
            raise ApiError(404, DISABLED, None, "runtime_lora_updating_disabled")
        await adapters.load(body, checker)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
              responses=_docs("the name is removed (vLLM's plain-text answer)"))  # fmt: skip
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
        if not enabled:
            raise ApiError(404, DISABLED, None, "runtime_lora_updating_disabled")
        await adapters.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
