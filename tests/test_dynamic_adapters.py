"""vLLM's runtime adapter API in-process (FastAPI over the plain-Python model service on the tiny random Llama, no
Ray): POST /v1/load_lora_adapter and /v1/unload_lora_adapter answer vLLM's plain-text 200s and an OpenAI-shaped
error for every refusal (disabled 404, bad body 400, path or foreign URL 400, unknown 404, name taken 400/409,
corrupt or too-high-rank adapter 422, missing key 401); a loaded name is listed by /v1/models (also through the
official `openai` client) and answers token for token like the same adapter under its catalog or store name; after
unload it is gone (404) while a stream already running on it finishes normally.

Run: `.venv/bin/python -m pytest -q tests/test_dynamic_adapters.py` (about 10-20 s).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_harness import build, client, live
from bad_adapters import write_bad_adapters

from adapters.random_adapter import write_random_adapter
from serve_app import dynamic_adapters
from serve_app.dynamic_adapters import source_model
from serve_app.metrics import NullMetrics

HI = [{"role": "user", "content": "hi"}]
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


class _Finished(NullMetrics):
    """Records each finished request's status, to tell whether a generation was still running at some moment."""

    def __init__(self) -> None:
        self.done: list[tuple[str, str]] = []

    def request(self, adapter: str, status: str) -> None:
        self.done.append((adapter, status))


@pytest.fixture(scope="module")
def folders(tiny_shapes, tmp_path_factory) -> dict[str, Path]:
    """A catalog (ad0, ad1, a corrupt one, a rank-32 one) and a file:// adapter store holding a copy of ad1 (st1)."""
    root = tmp_path_factory.mktemp("dyn")
    catalog, store = root / "catalog", root / "store"
    for i in range(2):
        write_random_adapter(catalog / f"ad{i}", tiny_shapes, rank=8, seed=i)
    write_random_adapter(catalog / "big", tiny_shapes, rank=32, seed=5)
    write_bad_adapters(catalog, catalog / "ad0", ("corrupt",))
    store.mkdir()
    shutil.copytree(catalog / "ad1", store / "st1")
    return {"catalog": catalog, "store": store}


def _app(tiny_base, folders, **config: Any):
    return build(tiny_base, folders["catalog"], allow_runtime_lora_updating=True,
                 adapter_store_prefixes=[f"file://{folders['store']}/"], **config)  # fmt: skip


@pytest.fixture(scope="module")
def served(tiny_base, folders) -> Iterator[tuple[Any, Any]]:
    with _app(tiny_base, folders) as (app, service):
        yield app, service


def _call(app: Any, *requests: tuple[str, str, Any]) -> list[httpx.Response]:
    """Send (method, path, json body or raw bytes) requests in order; their responses."""

    async def go() -> list[httpx.Response]:
        async with client(app) as http:
            out = []
            for method, path, body in requests:
                kw = (
                    {"content": body, "headers": {"content-type": "application/json"}}
                    if isinstance(body, bytes)
                    else {"json": body}
                )
                out.append(await http.request(method, path, **kw))
            return out

    return asyncio.run(go())


def _chat(model: str, **extra: Any) -> tuple[str, str, dict[str, Any]]:
    return ("POST", "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 8, "temperature": 0,
                                             "logprobs": True, **extra})  # fmt: skip


def _error(response: httpx.Response, status: int, param: str | None, needle: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert needle in error["message"], error
    return error


def _answer(response: httpx.Response) -> tuple[str, list[tuple[str, float]], int]:
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    tokens = [(t["token"], t["logprob"]) for t in choice["logprobs"]["content"]]
    return choice["message"]["content"], tokens, body["usage"]["completion_tokens"]


def _ids(app: Any) -> dict[str, dict[str, Any]]:
    (response,) = _call(app, ("GET", "/v1/models", None))
    assert response.status_code == 200, response.text
    return {m["id"]: m for m in response.json()["data"]}


def test_load_serves_the_name_token_for_token_like_the_catalog_name_then_unload_removes_it(served) -> None:
    app, _ = served
    load, by_name, by_catalog, lorax = _call(
        app, ("POST", LOAD, {"lora_name": "mine", "lora_path": "ad0"}), _chat("mine"), _chat("ad0"),
        ("POST", "/generate", {"inputs": "hello", "parameters": {"adapter_id": "mine", "max_new_tokens": 4}}),
    )  # fmt: skip
    assert load.status_code == 200 and load.headers["content-type"].startswith("text/plain")
    assert load.text == "Success: LoRA adapter 'mine' added successfully."
    assert _answer(by_name) == _answer(by_catalog)
    assert _answer(by_name)[0] != _answer(_call(app, _chat("ad1"))[0])[0]  # the adapter matters
    assert lorax.status_code == 200 and lorax.json()["generated_text"], lorax.text
    card = _ids(app)["mine"]
    assert card["parent"] == "tiny-llama" and card["root"] == "ad0"
    assert card["lorafleet"]["adapter_id"] == _ids(app)["ad0"]["lorafleet"]["adapter_id"]

    unload, after, again = _call(app, ("POST", UNLOAD, {"lora_name": "mine"}), _chat("mine"),
                                 ("POST", UNLOAD, {"lora_name": "mine"}))  # fmt: skip
    assert unload.status_code == 200 and unload.text == "Success: LoRA adapter 'mine' removed successfully."
    _error(after, 404, "model", "mine")
    assert after.json()["error"]["code"] == "model_not_found"
    _error(again, 404, "lora_name", "cannot be found")
    assert "mine" not in _ids(app) and "ad0" in _ids(app)
    assert _answer(_call(app, _chat("ad0"))[0]) == _answer(by_catalog)  # the registry adapter is untouched


def test_store_uri_loads_and_load_inplace_repoints_a_name(served, folders) -> None:
    app, _ = served
    uri = f"file://{folders['store']}/st1"
    first, taken, by_store, inplace, by_ad0 = _call(
        app, ("POST", LOAD, {"lora_name": "swap", "lora_path": uri}),
        ("POST", LOAD, {"lora_name": "swap", "lora_path": "ad0"}), _chat("swap"),
        ("POST", LOAD, {"lora_name": "swap", "lora_path": "ad0", "load_inplace": True}), _chat("swap"),
    )  # fmt: skip
    assert first.status_code == 200, first.text
    _error(taken, 400, "lora_name", "already been loaded")
    assert _answer(by_store) == _answer(_call(app, _chat("ad1"))[0])  # st1 is a copy of ad1
    assert inplace.status_code == 200, inplace.text
    assert _answer(by_ad0) == _answer(_call(app, _chat("ad0"))[0])
    assert _ids(app)["swap"]["root"] == "ad0"
    assert _call(app, ("POST", UNLOAD, {"lora_name": "swap"}))[0].status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        ({"lora_name": "tiny-llama", "lora_path": "ad0"}, 409, "lora_name", "base model"),
        ({"lora_name": "ad1", "lora_path": "ad0"}, 409, "lora_name", "registry adapter (local: local:ad1:"),
        ({"lora_name": "x1", "lora_path": "/etc/passwd"}, 400, "lora_path", "filesystem path"),
        ({"lora_name": "x1", "lora_path": "./ad0"}, 400, "lora_path", "filesystem path"),
        ({"lora_name": "x1", "lora_path": "ad0/../ad1/x"}, 400, "lora_path", "filesystem path"),
        ({"lora_name": "x1", "lora_path": "C:\\adapters\\ad0"}, 400, "lora_path", "filesystem path"),
        ({"lora_name": "x1", "lora_path": "s3://elsewhere/lora/ad0"}, 400, "lora_path", "adapter_store_prefixes"),
        ({"lora_name": "x1", "lora_path": "file:///etc/ad0"}, 400, "lora_path", "outside the allowed"),
        ({"lora_name": "x1", "lora_path": "https://example.com/a.safetensors"}, 400, "lora_path", "URL"),
        ({"lora_name": "x1", "lora_path": "some-org/some-lora"}, 400, "lora_path", "hub_adapters: none"),
        ({"lora_name": "x1", "lora_path": "models:/ad0"}, 400, "lora_path", "models:/<name>@<alias>"),
        ({"lora_name": "x1", "lora_path": "tiny-llama"}, 400, "lora_path", "base model"),
        ({"lora_name": "x1", "lora_path": "no-such-adapter"}, 404, "lora_path", "does not exist"),
        ({"lora_name": "x1", "lora_path": "models:/no-such@champion"}, 404, "lora_path", "does not exist"),
        ({"lora_name": "x1", "lora_path": "corrupt"}, 422, "lora_path", "cannot be served"),
        ({"lora_name": "x1", "lora_path": "big"}, 422, "lora_path", "rank"),
        ({"lora_name": "x1"}, 400, "lora_path", "lora_path"),
        ({"lora_name": "../x", "lora_path": "ad0"}, 400, "lora_name", "lora_name"),
        ({"lora_name": "x1", "lora_path": "ad0", "adapter_source": "s3"}, 400, "adapter_source", "adapter_source"),
        ({"lora_name": "x1", "lora_path": "ad0", "load_inplace": "yes"}, 400, "load_inplace", "load_inplace"),
        (b"{not json", 400, None, "not valid JSON"),
    ],
)
def test_refused_loads_get_openai_errors_and_change_nothing(served, body, status, param, needle) -> None:
    app, _ = served
    before = _ids(app)
    (response,) = _call(app, ("POST", LOAD, body))
    error = _error(response, status, param, needle)
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error",
                             422: "invalid_request_error"}[status]  # fmt: skip
    assert _ids(app) == before
    assert _answer(_call(app, _chat("ad0"))[0])[2] == 8  # others keep serving


def test_the_number_of_loaded_names_is_bounded(served, monkeypatch) -> None:
    monkeypatch.setattr(dynamic_adapters, "MAX_NAMES", 1)
    app, _ = served
    first, second, unload = _call(app, ("POST", LOAD, {"lora_name": "one", "lora_path": "ad0"}),
                                  ("POST", LOAD, {"lora_name": "two", "lora_path": "ad0"}),
                                  ("POST", UNLOAD, {"lora_name": "one"}))  # fmt: skip
    assert first.status_code == 200 and unload.status_code == 200
    assert _error(second, 400, "lora_name", "at most 1 adapters")["code"] == "too_many_adapters"


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        ({"lora_name": "never-loaded"}, 404, "lora_name", "cannot be found"),
        ({"lora_name": "ad0"}, 404, "lora_name", "only adapters loaded with"),
        ({"lora_name": "tiny-llama", "lora_int_id": 1}, 404, "lora_name", "cannot be found"),
        ({}, 400, "lora_name", "lora_name"),
        ({"lora_name": 3}, 400, "lora_name", "lora_name"),
    ],
)
def test_refused_unloads(served, body, status, param, needle) -> None:
    _error(_call(served[0], ("POST", UNLOAD, body))[0], status, param, needle)
    assert "ad0" in _ids(served[0])


def test_disabled_by_default_and_behind_the_api_key(tiny_base, folders, monkeypatch) -> None:
    with build(tiny_base, folders["catalog"]) as (app, _):
        load, unload = _call(app, ("POST", LOAD, {"lora_name": "x1", "lora_path": "ad0"}),
                             ("POST", UNLOAD, {"lora_name": "x1"}))  # fmt: skip
        for response in (load, unload):
            assert (
                _error(response, 404, None, "allow_runtime_lora_updating")["code"] == "runtime_lora_updating_disabled"
            )
        assert "x1" not in _ids(app)
    monkeypatch.setenv("LORAFLEET_API_KEY", "sekret")
    with _app(tiny_base, folders) as (app, _):

        async def go() -> list[httpx.Response]:
            body = {"lora_name": "keyed", "lora_path": "ad0"}
            async with client(app) as http:
                return [await http.post(LOAD, json=body),
                        await http.post(LOAD, json=body, headers={"Authorization": "Bearer wrong"}),
                        await http.post(LOAD, json=body, headers={"Authorization": "Bearer sekret"}),
                        await http.post(UNLOAD, json={"lora_name": "keyed"}),
                        await http.get("/v1/models", headers={"Authorization": "Bearer sekret"})]  # fmt: skip

        none, wrong, right, unkeyed_unload, models = asyncio.run(go())
        for response in (none, wrong, unkeyed_unload):
            _error(response, 401, None, "API key")
        assert right.status_code == 200, right.text
        assert "keyed" in [m["id"] for m in models.json()["data"]]


def test_openai_client_lists_the_loaded_name(served) -> None:
    from openai import AsyncOpenAI

    app, _ = served

    async def go() -> tuple[list[str], list[str]]:
        async with client(app) as http:
            openai = AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http)
            assert (await http.post(LOAD, json={"lora_name": "listed", "lora_path": "ad1"})).status_code == 200
            listed = [m.id async for m in openai.models.list()]
            answer = await openai.chat.completions.create(model="listed", messages=HI, max_tokens=4, temperature=0)
            assert answer.model == "listed" and answer.choices[0].message.content is not None
            assert (await http.post(UNLOAD, json={"lora_name": "listed"})).status_code == 200
            return listed, [m.id async for m in openai.models.list()]

    listed, after = asyncio.run(go())
    assert "listed" in listed and "ad1" in listed
    assert "listed" not in after and "ad1" in after


def test_a_stream_running_on_an_unloaded_name_finishes_and_new_requests_get_404(served, monkeypatch) -> None:
    """The unload returns while the stream's generation is still running (the service has not finished it), and
    the stream still ends normally with every token, usage and [DONE]."""
    app, service = served
    metrics = _Finished()
    monkeypatch.setattr(service, "metrics", metrics)
    max_tokens = 200
    body = {"model": "long", "messages": HI, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with live(app) as url, httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        assert http.post(LOAD, json={"lora_name": "long", "lora_path": "ad1"}).status_code == 200
        with http.stream("POST", "/v1/chat/completions", json=body) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: ") and '"content"' in line)
            unloaded = http.post(UNLOAD, json={"lora_name": "long"})
            running_at_unload = not metrics.done
            rest = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        assert unloaded.status_code == 200, unloaded.text
        assert running_at_unload, metrics.done
        missing = http.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None})
    _error(missing, 404, "model", "long")
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(d) for d in rest[:-1]]
    assert "error" not in json.dumps(chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == max_tokens
    assert json.loads(first[len("data: ") :])["model"] == "long"
    assert metrics.done and metrics.done[-1][1] == "ok" and metrics.done[-1][0].startswith("local:ad1:")


@pytest.mark.parametrize(
    ("path", "model"),
    [("models:/sentiment@champion", "sentiment@champion"), ("models:/sentiment/3", "sentiment/3"),
     ("sentiment", "sentiment"), ("sentiment@staging", "sentiment@staging"), ("sentiment/12", "sentiment/12")],
)  # fmt: skip
def test_mlflow_forms_map_to_registry_model_strings(path: str, model: str) -> None:
    from adapters.registry import AdapterRegistry

    assert source_model(path, AdapterRegistry("tiny-llama")) == model


SCHEMATHESIS = """
[checks.positive_data_acceptance]
expected-statuses = ["2XX", "400", "404", "409", "422"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "404", "405", "413", "415", "422"]
"""


def test_schemathesis_finds_nothing_on_the_enabled_routes(tiny_base, folders) -> None:
    """tests/test_openapi.py checks the whole document with these routes off (404); here they are on."""
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.config import SchemathesisConfig

    failures: list[str] = []
    sent = 0
    with _app(tiny_base, folders) as (app, _):
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_str(SCHEMATHESIS))
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path not in (LOAD, UNLOAD):
                continue
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @hypothesis.seed(20261204)
                @hypothesis.settings(max_examples=30, deadline=None, database=None,
                                     suppress_health_check=list(hypothesis.HealthCheck),
                                     phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])  # fmt: skip
                @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
                def run(case: Any) -> None:
                    nonlocal sent
                    sent += 1
                    try:
                        case.call_and_validate()
                    except (Exception, BaseExceptionGroup) as err:
                        failures.append(f"{operation.label} {mode.value}: {str(err)[:600]}")  # noqa: B023

                run()
    assert not failures, "\n\n".join(sorted(set(failures))[:5])
    assert sent >= 100
