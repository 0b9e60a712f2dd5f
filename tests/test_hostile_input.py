"""Hostile input against the HTTP API, in-process (FastAPI + the plain-Python engine on the tiny random Llama).

Run: `pytest tests/test_hostile_input.py -q` (about a minute on 2 CPU cores; add `-s` to see the status counts).

1. Property-based (hypothesis, derandomized), one test: >= 1,000 generated requests, counted as they are
   answered, over /v1/chat/completions, /v1/completions, /generate and /generate_stream — arbitrary JSON, right
   keys with wrong types, extra keys, unicode / path / URL / huge `model` strings, negative / huge / NaN /
   Infinity numbers (raw JSON tokens), mangled bytes. Every answer: a status in ALLOWED_STATUSES; a 4xx is an
   OpenAI-shaped error; a 2xx only for a body the oracle in tests/hostile_fuzz.py does not refuse; bodies built
   to be valid must get 200.
2. Hand-written: path traversal (no file touched outside the catalog), huge / negative / NaN numbers, a 10 MB
   body (413 without reading it), 100k-deep JSON, invalid UTF-8, thousands of stop strings, bad Content-Length,
   a flood of unknown adapters, a pickle-only adapter, API keys, queue full (429 + Retry-After), tiny
   temperatures and an adapter whose weights overflow (must not fail the other requests in the batch).
3. Afterwards: RSS within 100 MB of the warmed-up baseline, no sequence left in the engine, caches bounded.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hostile_fuzz import (
    ADAPTERS,
    ENDPOINTS,
    KEY_ENV,
    Harness,
    check_error,
    check_success,
    fuzz_body,
    mangled_bytes,
    must_refuse,
    mutated_body,
    valid_body,
    write_catalog,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from adapters.lora_files import WEIGHTS_FILE, read_lora
from adapters.random_adapter import write_random_adapter
from adapters.sources import mlflow_registry
from serve_app.api import create_api
from serve_app.engine import EngineConfig, LoraEngine
from serve_app.engine.sequence import SamplingParams

psutil = pytest.importorskip("psutil")
HI = [{"role": "user", "content": "hi"}]
FUZZ = settings(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])  # fmt: skip
FUZZ_EXAMPLES = {"json": 140, "mutated": 110, "valid": 30, "bytes": 30}  # x 4 endpoints = 1,240 requests


@pytest.fixture(scope="module")
def catalog(tiny_shapes: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_catalog(tmp_path_factory.mktemp("hostile") / "catalog", tiny_shapes)
    (root / "pickled").mkdir()  # PEFT's old format: a pickle the server must never unpickle
    shutil.copy(root / "ad0" / "adapter_config.json", root / "pickled")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")
    write_random_adapter(root / "huge", tiny_shapes, rank=8, seed=7)  # finite weights that overflow: refused
    tensors = {k: v * 1e30 for k, v in load_file(root / "huge" / WEIGHTS_FILE).items()}
    save_file(tensors, root / "huge" / WEIGHTS_FILE)
    write_random_adapter(root.parent / "outside", tiny_shapes, rank=8, seed=9)  # a valid adapter beside the catalog
    return root


@pytest.fixture(scope="module")
def h(tiny_base: Any, catalog: Path) -> Iterator[Harness]:
    harness = Harness(tiny_base, catalog)
    for path in ENDPOINTS:  # warm-up: every endpoint and adapter, valid and invalid, before the RSS baseline
        for model in (*ADAPTERS, "tiny-llama", "nope"):
            body = ({"inputs": "hi", "parameters": {"adapter_id": model, "max_new_tokens": 3}} if path[1] == "g"
                    else {"model": model, "messages": HI, "prompt": "hi", "max_tokens": 3, "stream": model == "ad1"})  # fmt: skip
            harness.post(path, body)
    harness.baseline_rss = psutil.Process().memory_info().rss
    yield harness
    harness.close()


ALLOWED_STATUSES = {200, 400, 404}  # what a generated request may get (none refers to a bad adapter or fills the queue)
MIN_REQUESTS = 1000


def fuzz_check(h: Harness, path: str, body: Any, response: httpx.Response, must_succeed: bool = False) -> None:
    h.statuses[response.status_code] += 1
    assert response.status_code == 200 or not must_succeed, f"valid body refused: {body!r} -> {response.text}"
    if response.status_code >= 400:
        check_error(response)
        return
    assert not must_refuse(path, body), f"accepted a body that must be refused: {body!r}"
    check_success(path, body, response)


def _fuzz(h: Harness, path: str) -> None:
    """Every strategy against one endpoint; each request's status lands in `h.statuses`."""

    @settings(FUZZ, max_examples=FUZZ_EXAMPLES["json"])
    @given(body=fuzz_body(path))
    def json_bodies(body: Any) -> None:
        fuzz_check(h, path, body, h.post(path, body))

    @settings(FUZZ, max_examples=FUZZ_EXAMPLES["mutated"])
    @given(body=mutated_body(path))
    def one_hostile_field(body: Any) -> None:
        fuzz_check(h, path, body, h.post(path, body))

    @settings(FUZZ, max_examples=FUZZ_EXAMPLES["valid"])
    @given(body=valid_body(path))
    def valid_bodies(body: dict[str, Any]) -> None:
        fuzz_check(h, path, body, h.post(path, body), must_succeed=True)

    @settings(FUZZ, max_examples=FUZZ_EXAMPLES["bytes"])
    @given(content=mangled_bytes(), content_type=st.sampled_from(["application/json", "text/plain", ""]))
    def raw_bytes(content: bytes, content_type: str) -> None:
        response = h.post(path, content=content, headers={"content-type": content_type})
        h.statuses[response.status_code] += 1
        if response.status_code >= 300 or b"ad0" not in content:  # only the intact valid document may pass
            check_error(response)

    for run in (json_bodies, one_hostile_field, valid_bodies, raw_bytes):
        run()


# -- 1. property-based --------------------------------------------------------------------------------------------
def test_fuzz_over_1000_requests_get_only_allowed_statuses(h: Harness) -> None:
    """Every endpoint, every strategy; the requests are counted as they are answered (hypothesis may run fewer
    examples than its `max_examples` ceiling), so the bound holds for what was actually sent."""
    h.statuses.clear()
    for path in ENDPOINTS:
        _fuzz(h, path)
    sent = sum(h.statuses.values())
    print(f"\ngenerated requests: {sent}, statuses: {dict(sorted(h.statuses.items()))}")
    assert sent >= MIN_REQUESTS, f"only {sent} generated requests were sent"
    assert set(h.statuses) <= ALLOWED_STATUSES, dict(h.statuses)
    assert h.statuses[200] >= len(ENDPOINTS) * FUZZ_EXAMPLES["valid"] // 2 and h.statuses[400] > 0, dict(h.statuses)


# -- 2. hand-written ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["../../etc/passwd", "../outside", "/etc/passwd", "http://x/y", "s3://b/k",
                                   "file:///etc/passwd", "ad0/../ad1", "..", "~/x", "%2e%2e%2foutside", "a" * 300])  # fmt: skip
def test_traversal_and_url_ids_are_404_without_touching_files(h: Harness, catalog: Path, model: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    touched: list[str] = []
    real_stat, real_open = os.stat, os.open
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: touched.append(str(p)) or real_stat(p, *a, **k))
    monkeypatch.setattr(os, "open", lambda p, *a, **k: touched.append(str(p)) or real_open(p, *a, **k))
    assert h.post("/v1/chat/completions", {"model": "not-here", "messages": HI}).status_code == 404
    assert any("not-here" in p for p in touched), touched  # the hook sees catalog look-ups
    chat = h.post("/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 2})
    lorax = h.post("/generate", {"inputs": "hi", "parameters": {"adapter_id": model, "max_new_tokens": 2}})
    monkeypatch.undo()
    for response, param in ((chat, "model"), (lorax, "parameters.adapter_id")):
        assert response.status_code in (400, 404), response.text
        error = check_error(response)
        assert error["param"] == param and (model[:50] in error["message"] or "256" in error["message"]), error
    outside = [p for p in touched if not Path(p).resolve().is_relative_to(catalog.resolve())]
    assert not outside, f"file system touched outside the catalog: {outside}"


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(("field", "value"), [("max_tokens", 10**9), ("max_tokens", 2**70), ("max_tokens", 0),
                         ("max_tokens", -1), ("max_tokens", "NaN"), ("temperature", -0.5), ("temperature", "NaN"),
                         ("temperature", "Infinity"), ("top_p", "-Infinity"), ("top_p", 0), ("seed", -1),
                         ("seed", 2**64), ("seed", "NaN")])  # fmt: skip
def test_bad_numbers_get_400_naming_the_field(h: Harness, path: str, field: str, value: Any) -> None:
    raw = value if isinstance(value, str) else str(value)  # "NaN" / "Infinity" as raw JSON tokens, not strings
    if path[1] == "g":
        field = "max_new_tokens" if field == "max_tokens" else field
        content = f'{{"inputs": "hi", "parameters": {{"adapter_id": "ad0", "{field}": {raw}}}}}'
    else:
        text = f'"messages": {HI}' if "chat" in path else '"prompt": "hi"'  # requests are strict: no extra fields
        content = f'{{"model": "ad0", {text}, "{field}": {raw}}}'.replace("'", '"')
    response = h.post(path, content=content.encode())
    assert response.status_code == 400, response.text
    error = check_error(response)
    assert error["param"] == (f"parameters.{field}" if path[1] == "g" else field) and field in error["message"], error


async def _chunks(total: int, counter: list[int], chunk: int = 65536) -> AsyncIterator[bytes]:
    while counter[0] < total:
        counter[0] += chunk
        yield b"x" * chunk


@pytest.mark.parametrize("declared", [True, False])
def test_10mb_body_is_413_without_reading_it(h: Harness, declared: bool) -> None:
    sent, total = [0], 10 * 2**20
    headers = {"content-length": str(total)} if declared else {}  # else chunked: the server must stop reading
    response = h.post("/v1/chat/completions", content=_chunks(total, sent), headers=headers)  # type: ignore[arg-type]
    assert response.status_code == 413 and "bytes" in check_error(response)["message"]
    assert sent[0] <= (0 if declared else h.config.max_request_bytes + 65536), f"read {sent[0]} bytes"


@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"a":' * 100_000, b'{"model": "ad0", "messages": ' + b"[" * 100_000,
                                     b'{"model": "ad0", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                                     b"\xc3\x28\xa0\xa1", b"\xef\xbb\xbf{}", b"", b"1" * 5000, b"\x00" * 100])  # fmt: skip
def test_deep_nesting_and_invalid_utf8_are_400(h: Harness, content: bytes) -> None:
    for path in ENDPOINTS:
        response = h.post(path, content=content)
        assert response.status_code == 400, response.text
        check_error(response)


@pytest.mark.parametrize(("value", "status"), [(b"\xb2", 400), (b"-1", 400), (b"1e3", 400), (b" 12", 400),
                                               (b"9" * 5000, 413), (b"0" * 5000 + b"2", 400)])  # fmt: skip
def test_malformed_content_length_is_4xx_not_500(h: Harness, value: bytes, status: int) -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"content-length", value), (b"content-type", b"application/json")],
             "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("c", 1), "root_path": ""}  # fmt: skip
    h.run(h.app(scope, receive, send))
    assert sent[0]["status"] == status, sent
    assert b'"error"' in sent[1]["body"]


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("stop", [["x"] * 5000, ["x"] * 17, ["y" * 10_000], "z" * 10_000, [""]])
def test_oversized_stop_lists_are_400(h: Harness, path: str, stop: Any) -> None:
    if path[1] == "g":
        body = {"inputs": "hi", "parameters": {"adapter_id": "ad0", "stop": stop if isinstance(stop, list) else [stop]}}
    else:
        body = {"model": "ad0", "messages": HI, "prompt": "hi", "stop": stop}
    response = h.post(path, body)
    assert response.status_code == 400 and "stop" in (check_error(response)["param"] or ""), response.text


def test_sixteen_stop_strings_of_200_chars_are_accepted(h: Harness) -> None:
    body = {"model": "ad0", "messages": HI, "max_tokens": 3, "stop": [chr(65 + i) * 200 for i in range(16)]}
    assert h.post("/v1/chat/completions", body).status_code == 200


def test_flood_of_unknown_adapters_is_404_and_leaves_nothing_behind(h: Harness) -> None:
    async def flood() -> list[httpx.Response]:
        calls = []
        for i in range(300):
            model = [f"nope-{i}", f"../nope{i}", f"http://h/{i}", f"ghost@v{i}", f"ghost/{i}"][i % 5]
            if i % 2:
                calls.append(h.client.post("/v1/chat/completions", json={"model": model, "messages": HI}))
            else:
                calls.append(h.client.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": model}}))
        return await asyncio.gather(*calls)

    loaded_before = dict(h.service.engine.engine.adapters)
    responses = h.run(flood())
    assert [r.status_code for r in responses] == [404] * 300
    assert {check_error(r)["param"] for r in responses} == {"model", "parameters.adapter_id"}
    assert h.service.engine.engine.adapters.keys() == loaded_before.keys()  # nothing loaded or cached per name
    assert len(h.backend._lru) <= h.backend.max_adapters
    assert not any("nope" in k or "ghost" in k for k in (*h.service._load_locks, *h.service._rejected, *h.backend._lru))
    assert h.post("/v1/chat/completions", {"model": "ad1", "messages": HI, "max_tokens": 3}).status_code == 200


def test_mlflow_lookup_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = mlflow_registry.MlflowRegistry("http://127.0.0.1:9", ttl_s=60)
    monkeypatch.setattr(registry, "_lookup", lambda name, alias, version: None)
    for i in range(mlflow_registry.MAX_CACHED + 500):
        assert registry.resolve(f"unknown-{i}") is None
    assert len(registry._cache) == mlflow_registry.MAX_CACHED


def test_removed_adapter_is_unknown_not_a_crash(h: Harness, catalog: Path, tiny_shapes: Any) -> None:
    write_random_adapter(catalog / "short-lived", tiny_shapes, rank=4, seed=3)
    ref = h.service.registry.resolve("short-lived")
    shutil.rmtree(catalog / "short-lived")
    from adapters.registry import UnknownAdapter

    with pytest.raises(UnknownAdapter):
        h.service.registry.fetch(ref)


def test_pickle_only_adapter_is_refused_and_others_keep_serving(h: Harness) -> None:
    async def mixed() -> list[httpx.Response]:
        bodies = [{"model": m, "messages": HI, "max_tokens": 3, "temperature": 0} for m in ["pickled", "ad0"] * 4]
        return await asyncio.gather(*(h.client.post("/v1/chat/completions", json=b) for b in bodies))

    responses = h.run(mixed())
    for pickled, good in zip(responses[::2], responses[1::2], strict=True):
        assert pickled.status_code == 422 and "pickle" in check_error(pickled)["message"], pickled.text
        assert good.status_code == 200, good.text
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses[1::2]}) == 1


def test_tiny_temperatures_and_overflowing_adapter_do_not_fail_the_batch(h: Harness) -> None:
    greedy = {"model": "ad0", "messages": HI, "max_tokens": 4, "temperature": 0}
    expected = h.post("/v1/chat/completions", greedy).json()["choices"][0]["message"]["content"]
    hostile = [("/v1/chat/completions", {"model": "ad0", "messages": HI, "max_tokens": 4, "temperature": 5e-324}),
               ("/v1/completions", {"model": "ad1", "prompt": "hi", "max_tokens": 4, "temperature": 1e-40}),
               ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 4, "do_sample": True, "temperature": 1e-300}})]  # fmt: skip

    async def together() -> list[httpx.Response]:
        calls = [h.client.post(p, json=b) for p, b in hostile] + [
            h.client.post("/v1/chat/completions", json=greedy)
        ] * 3
        return await asyncio.gather(*calls)

    responses = h.run(together())
    assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses]
    assert {r.json()["choices"][0]["message"]["content"] for r in responses[-3:]} == {expected}
    huge = h.post("/v1/chat/completions", {"model": "huge", "messages": HI, "max_tokens": 4, "temperature": 1.0})
    assert huge.status_code == 422 and "overflow" in check_error(huge)["message"], huge.text


def test_overflowing_adapter_cannot_corrupt_the_next_request_in_its_kv_slot(tiny_base: Any, catalog: Path) -> None:
    """Weights that pass validation can still overflow (e.g. fp16): its NaN K/V must not reach the slot's next user
    through the attention mask. Registered directly, bypassing the load-time magnitude check."""
    engine = LoraEngine(tiny_base, EngineConfig(max_seq_len=128, max_running=2, max_loras=2))
    engine.register_adapter("ad0", catalog / "ad0")
    weights = read_lora(catalog / "ad0", engine.shapes, engine.config.max_lora_rank)
    weights.modules = {k: (a * 1e15, b * 1e15) for k, (a, b) in weights.modules.items()}
    engine.register_adapter("boom", weights)
    prompt = engine.tokenizer("hello there").input_ids

    def run(*requests: tuple[str, list[int], str | None]) -> dict[str, list[Any]]:
        for rid, ids, adapter in requests:
            engine.add_request(rid, ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), adapter)
        outs: dict[str, list[Any]] = {}
        while engine.has_work():
            for out in engine.step():
                outs.setdefault(out.request_id, []).append(out)
        return outs

    reference = [o.token_id for o in run(("ref", prompt, "ad0"))["ref"]]
    boom = run(("boom", engine.tokenizer("a much longer prompt that fills the slot").input_ids, "boom"))["boom"]
    assert boom[-1].finish_reason == "error" and "non-finite" in boom[-1].error
    # the short request lands in the poisoned slot while a longer one makes it read past its own length
    after = run(("again", prompt, "ad0"), ("long", engine.tokenizer("x" * 60).input_ids, None))
    assert [o.token_id for o in after["again"]] == reference
    assert bool(torch.isfinite(engine.kv.k).all() and torch.isfinite(engine.kv.v).all())


def test_api_key(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "s3cret-key")
    app = create_api(h.backend, h.service.registry, h.service.base_name, h.config)
    body = {"model": "ad0", "messages": HI, "max_tokens": 2}

    async def go() -> list[httpx.Response]:
        async with Harness.client_for(app) as c:
            auth = [{}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-key"},
                    {"authorization": "Basic czNjcmV0LWtleQ=="}, {"authorization": "Bearer s3cret-ke"}]  # fmt: skip
            refused = [await c.post("/v1/chat/completions", json=body, headers=a) for a in auth]
            refused.append(await c.get("/v1/models"))
            refused.append(await c.post("/generate", content=b"x" * 2_000_000))  # 401 before the body is read
            ok = await c.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer s3cret-key"})
            return [*refused, ok, await c.get("/health")]

    *refused, ok, health = h.run(go())
    for response in refused:
        assert response.status_code == 401 and check_error(response)["type"] == "authentication_error"
    assert ok.status_code == 200 and health.status_code == 200


def test_full_queue_is_429_with_retry_after(tiny_base: Any, catalog: Path) -> None:
    small = Harness(tiny_base, catalog, max_running=1, max_queue=1)
    try:
        body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 40, "temperature": 0}

        async def burst() -> list[httpx.Response]:
            return await asyncio.gather(*(small.client.post("/v1/completions", json=body) for _ in range(12)))

        responses = small.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429} and codes.count(200) >= 1, codes
        for response in responses:
            if response.status_code == 429:
                assert response.headers["retry-after"] == "1" and check_error(response)["type"] == "rate_limit_error"
        stats = small.service.engine.stats()
        assert (stats.running, stats.waiting) == (0, 0)
    finally:
        small.close()


# -- 3. afterwards ------------------------------------------------------------------------------------------------
def test_memory_back_to_baseline_and_engine_idle(h: Harness) -> None:
    import gc

    gc.collect()
    h.run(asyncio.sleep(0.1))  # a server's loop keeps running: let it finalize the last requests' generators
    grown = (psutil.Process().memory_info().rss - h.baseline_rss) / 2**20
    assert grown < 100, f"RSS grew by {grown:.0f} MB"
    engine = h.service.engine
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (0, 0) and not engine.engine._by_id and not engine._streams
    assert len(h.backend._lru) <= h.backend.max_adapters
    assert len(h.service._load_locks) <= 8  # one per real adapter id at most, never per request or per name
