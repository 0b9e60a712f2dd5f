"""Helpers for tests of the HTTP API on the tiny model, in-process (no Ray): build the app over a real engine and
model service (`build`), and serve it on a loopback port with uvicorn in a thread (`live`) for clients that make
their own connections (lorax-client uses requests / aiohttp). No fixtures, nothing runs at import.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from adapters.random_adapter import write_random_adapter
from serve_app.api import create_api
from serve_app.app_config import ServeAppConfig
from serve_app.engine import EngineConfig, LoraEngine
from serve_app.model_service import LocalBackend, ModelService


def write_catalog(root: Path, shapes: Any, count: int = 2) -> Path:
    """`count` random rank-8 adapters ad0, ad1, ... in a local catalog folder."""
    for i in range(count):
        write_random_adapter(root / f"ad{i}", shapes, rank=8, seed=i)
    return root


@contextlib.contextmanager
def build(base: Any, catalog: Path, **config: Any) -> Iterator[tuple[Any, ModelService]]:
    """(FastAPI app, its ModelService) on `base`; `config` overrides ServeAppConfig fields."""
    settings = {"base_model": "tiny-llama", "catalog_dir": str(catalog), "mlflow_tracking_uri": "",
                "engine": EngineConfig(max_seq_len=256, max_loras=2), **config}  # fmt: skip
    cfg = ServeAppConfig(**settings)
    service = ModelService(cfg, engine=LoraEngine(base, cfg.engine))
    try:
        yield create_api(LocalBackend(service, max_adapters=2), service.registry, service.base_name, cfg), service
    finally:
        service.engine.shutdown()


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120)


@contextlib.contextmanager
def live(app: Any) -> Iterator[str]:
    """Serve `app` on a free loopback port (uvicorn, in a thread) and yield its base URL; stopped on exit."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
