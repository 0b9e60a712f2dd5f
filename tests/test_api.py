"""The HTTP API in-process (FastAPI over the plain-Python model service, no Ray): OpenAI and LoRAX shapes, the
official `openai` client, streaming, and a 4xx with an OpenAI-shaped body for every kind of bad input."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from bad_adapters import write_bad_adapters

from adapters.random_adapter import write_random_adapter
from serve_app.api import create_api
from serve_app.app_config import ServeAppConfig
from serve_app.engine import EngineConfig, LoraEngine
from serve_app.model_service import LocalBackend, ModelService

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def catalog(tiny_shapes, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalog")
    for i in range(3):
        write_random_adapter(root / f"ad{i}", tiny_shapes, rank=8, seed=i)
    write_bad_adapters(root, root / "ad0", ("pickled", "corrupt"))
    return root


@pytest.fixture(scope="module")
def app(tiny_base, catalog):
    config = ServeAppConfig(base_model="tiny-llama", catalog_dir=str(catalog), mlflow_tracking_uri="",
                            engine=EngineConfig(max_seq_len=256, max_loras=2), max_request_bytes=100_000)  # fmt: skip
    service = ModelService(config, engine=LoraEngine(tiny_base, config.engine))
    yield create_api(LocalBackend(service, max_adapters=2), service.registry, service.base_name, config)
    service.engine.shutdown()


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _run(coro):
    return asyncio.run(coro)


def test_openai_client_chat_completions_and_streaming(app) -> None:
    from openai import AsyncOpenAI

    async def go():
        async with _client(app) as http:
            client = AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http)
            full = await client.chat.completions.create(model="ad1", messages=HI, max_tokens=8, temperature=0)
            stream = await client.chat.completions.create(model="ad1", messages=HI, max_tokens=8, temperature=0,
                                                          stream=True, stream_options={"include_usage": True})  # fmt: skip
            chunks = [c async for c in stream]
            base = await client.chat.completions.create(model="tiny-llama", messages=HI, max_tokens=8, temperature=0)
            text = await client.completions.create(model="ad2", prompt="hello", max_tokens=5, temperature=0)
            return full, chunks, base, text

    full, chunks, base, text = _run(go())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert full.usage.completion_tokens == chunks[-1].usage.completion_tokens > 0
    assert chunks[0].choices[0].delta.role == "assistant"
    assert full.choices[0].message.content != base.choices[0].message.content  # the adapter answered
    assert text.object == "text_completion" and text.usage.completion_tokens == 5


def test_lorax_generate_and_stream(app) -> None:
    async def go():
        async with _client(app) as c:
            params = {"adapter_id": "ad0", "max_new_tokens": 6, "details": True}
            one = await c.post("/generate", json={"inputs": "hello", "parameters": params})
            async with c.stream("POST", "/generate_stream", json={"inputs": "hello", "parameters": params}) as r:
                lines = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: ")]
            return one, lines

    one, lines = _run(go())
    assert one.status_code == 200
    assert one.json()["details"]["generated_tokens"] == 6
    assert lines[-1]["generated_text"] == one.json()["generated_text"]
    assert "".join(x["token"]["text"] for x in lines) == one.json()["generated_text"]


def test_models_lists_base_and_servable_adapters_only(app) -> None:
    async def go():
        async with _client(app) as c:
            return (await c.get("/v1/models")).json()

    ids = [m["id"] for m in _run(go())["data"]]
    assert ids == ["tiny-llama", "ad0", "ad1", "ad2"]  # pickled / corrupt adapters are not listed


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "messages": HI}, 404, "does not exist"),
        ({"model": "../../etc/passwd", "messages": HI}, 404, "not a valid model id"),
        ({"model": "http://evil.example/x", "messages": HI}, 404, "not a valid model id"),
        ({"model": "ad0\n", "messages": HI}, 404, "not a valid model id"),
        ({"model": "pickled", "messages": HI}, 422, "pickle"),
        ({"model": "corrupt", "messages": HI}, 422, "corrupt"),
        ({"model": "ad1", "messages": HI, "max_tokens": 10**9}, 400, "context limit"),
        ({"model": "ad1", "messages": [{"role": "user", "content": "x" * 3000}]}, 400, "context limit"),
        ({"model": "ad1", "messages": HI, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "ad1", "messages": HI, "temperature": "NaN"}, 400, "temperature"),
        ({"model": "ad1", "messages": HI, "top_p": 0}, 400, "top_p"),
        ({"model": "ad1", "messages": HI, "n": 17}, 400, "n"),
        ({"model": "ad1", "messages": HI, "stop": ["x"] * 5000}, 400, "stop"),
        ({"model": "ad1", "messages": []}, 400, "messages"),
        ({"model": "ad1", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"messages": HI}, 400, "model"),
    ],
)
def test_bad_requests_get_4xx_with_openai_error(app, body, status, needle) -> None:
    async def go():
        async with _client(app) as c:
            return await c.post("/v1/chat/completions", json=body)

    response = _run(go())
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] or needle == error["param"]
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"{not json", 400),
        (b"\xff\xfe\xfa", 400),
        (b"[" * 50_000, 400),
        (b"x" * 200_000, 413),
        (json.dumps({"model": "ad0", "messages": HI, "pad": "y" * 200_000}).encode(), 413),
    ],  # fmt: skip
)
def test_malformed_and_oversized_bodies(app, content: bytes, status: int) -> None:
    async def go():
        async with _client(app) as c:
            response = await c.post("/v1/chat/completions", content=content,
                                    headers={"content-type": "application/json"})  # fmt: skip
            health = await c.get("/health")
            return response, health

    response, health = _run(go())
    assert response.status_code == status and "error" in response.json()
    assert health.status_code == 200  # still serving


def test_concurrent_mixed_requests_all_answered(app) -> None:
    async def go():
        async with _client(app) as c:
            bodies = [{"model": m, "messages": HI, "max_tokens": 6, "temperature": 0}
                      for m in ["ad0", "ad1", "ad2", "tiny-llama"] * 4]  # fmt: skip
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies)), bodies

    responses, bodies = _run(go())
    assert [r.status_code for r in responses] == [200] * len(bodies)
    by_model: dict[str, set[str]] = {}
    for body, r in zip(bodies, responses, strict=True):
        by_model.setdefault(body["model"], set()).add(r.json()["choices"][0]["message"]["content"])
    assert all(len(texts) == 1 for texts in by_model.values())  # greedy: same model, same answer, whatever the mix
