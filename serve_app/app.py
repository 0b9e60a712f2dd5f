"""The Ray Serve application: an HTTP ingress and a multiplexed model deployment. The Ray-specific layer only.

    serve run serve_app/config.yaml            # or: serve deploy serve_app/config.yaml (against a running cluster)
    curl localhost:8000/v1/chat/completions -d '{"model": "sentiment", "messages": [{"role": "user", "content": "..."}]}'

`Ingress` resolves the request's `model` to a canonical adapter id and calls `LoraModel` with that id as the
multiplexed model id, so Serve routes it preferentially to a replica that already holds the adapter. Each
`LoraModel` replica holds one base model and up to `adapters_per_replica` adapters (Serve's multiplex LRU; an
evicted adapter is unregistered from the engine), and batches every request it gets, whatever its adapter, in one
engine (see serve_app/engine). Adapter names added at run time (POST /v1/load_lora_adapter) are kept by the
Ingress, where all name resolution happens (serve_app/dynamic_adapters.py), so every model replica serves them.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api import create_api
from serve_app.app_config import ServeAppConfig

log = logging.getLogger(__name__)
serve_log = logging.getLogger("ray.serve")  # lands in the replica's own log file (logs/serve/replica_*.log)


class _AdapterHandle:
    """What Serve's multiplex cache holds per adapter; Serve calls `__del__` when it evicts the adapter."""

    def __init__(self, service: Any, adapter_id: str) -> None:
        self._service, self.adapter_id, self._released = service, adapter_id, False

    def __del__(self) -> None:  # called by Serve on eviction (in a thread) and again by GC: must be idempotent
        if not self._released:
            self._released = True
            self._service.unload_adapter(self.adapter_id)


@serve.deployment(max_ongoing_requests=64)
class LoraModel:
    def __init__(self, config: dict[str, Any]) -> None:
        import ray
        import torch

        from serve_app.metrics import RayMetrics
        from serve_app.model_service import ModelService

        cfg = ServeAppConfig.model_validate(config)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(cpus)))  # replicas sharing a node must not oversubscribe its cores
        self.service = service = ModelService(cfg, metrics=RayMetrics())
        gc.collect()
        gc.freeze()  # the model, tokenizer and engine live as long as the replica: keep them out of every GC pass

        async def load_adapter(adapter_id: str) -> _AdapterHandle:  # a closure: Serve sets attributes on it
            await service.load_adapter(adapter_id)
            return _AdapterHandle(service, adapter_id)

        self._multiplexed = serve.multiplexed(max_num_models_per_replica=cfg.adapters_per_replica)(load_adapter)

    async def generate(self, payload: dict[str, Any], adapter_id: str | None) -> AsyncIterator[dict[str, Any]]:
        if adapter_id:
            try:
                await self._multiplexed(adapter_id)  # registers with Serve's LRU (and the router's view)
            except Exception:
                pass  # the service reports the reason as an error event below
        async for event in self.service.generate(payload, adapter_id):
            yield event

    async def check_adapter(self, adapter_id: str) -> dict[str, Any] | None:
        """Load an adapter now (POST /v1/load_lora_adapter validates with it): None, or the error event."""
        try:
            await self._multiplexed(adapter_id)  # into Serve's LRU, like a request's load
        except Exception:
            pass  # the service reports the reason below
        return await self.service.try_load(adapter_id)

    def info(self) -> dict[str, Any]:
        return self.service.info()

    def check_health(self) -> None:
        if not self.service.engine._thread.is_alive():
            raise RuntimeError("engine loop thread died")


REPLICA_GONE = "replica_unavailable"  # error code of a generation cut short by its replica's death


def _replica_gone(err: BaseException) -> bool:
    """The model replica died (SIGKILL, out of memory, node lost) or cannot be reached: Ray's actor errors, or a
    transport error of Serve's gRPC channel to it (the replica's own exceptions arrive as RayTaskErrors)."""
    import grpc
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(err, (RayActorError, grpc.aio.AioRpcError)):
        return True
    return isinstance(err, RayTaskError) and isinstance(getattr(err, "cause", None), RayActorError)


class _RayBackend:
    """Calls LoraModel through its handle. Serve itself re-routes a request whose replica is found dead before it
    accepted the request; one already running there fails with the replica. Such a request is sent again (to
    another replica) when nothing of it has reached the client yet: the `start` event is held back until the
    first text. After text has gone out it cannot be replayed: the stream ends with a 503 error event (code
    `replica_unavailable`), which the API answers as a retryable 503 or, for answers sent whole, generates again."""

    retries = 2

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def stream(self, payload: dict[str, Any], adapter_id: str | None) -> AsyncIterator[dict[str, Any]]:
        options = {"stream": True, "multiplexed_model_id": adapter_id or ""}
        for attempt in range(self.retries + 1):
            held: dict[str, Any] | None = None
            forwarded = False
            try:
                async for event in self.handle.options(**options).generate.remote(payload, adapter_id):
                    if event["type"] == "start" and not forwarded:
                        held = event
                        continue
                    if held is not None:
                        yield held
                        held = None
                    forwarded = True
                    yield event
                if held is not None:
                    yield held
                return
            except Exception as err:
                if not _replica_gone(err):
                    raise
                serve_log.warning("model replica gone during a request (attempt %d, text sent: %s): %s", attempt + 1,
                            forwarded, str(err).splitlines()[0] if str(err) else type(err).__name__)  # fmt: skip
                if forwarded or attempt == self.retries:
                    yield {"type": "error", "status": 503, "param": None, "code": REPLICA_GONE,
                           "message": "the model replica serving this request stopped; retry the request"}  # fmt: skip
                    return

    async def check_adapter(self, adapter_id: str) -> dict[str, Any] | None:
        """Have a model replica load (and so validate) an adapter: None, or its error event."""
        options = {"multiplexed_model_id": adapter_id}
        return await self.handle.options(**options).check_adapter.remote(adapter_id)


@serve.deployment(max_ongoing_requests=512)
@serve.ingress()
class Ingress:
    def __init__(self, model: DeploymentHandle, config: dict[str, Any]) -> None:
        self.model = model
        self.config = ServeAppConfig.model_validate(config)

    async def __serve_build_asgi_app__(self) -> Any:
        info = await self.model.info.remote()
        cfg = self.config
        registry = cfg.build_registry(info["base_model"])
        return create_api(_RayBackend(self.model), registry, info["base_model"], cfg)


def build_app(args: dict[str, Any]) -> serve.Application:
    """App builder for `serve run` / `serve deploy`: `args` is the config file's `args:` (a ServeAppConfig)."""
    config = ServeAppConfig.model_validate(args or {}).model_dump()
    return Ingress.bind(LoraModel.bind(config), config)
