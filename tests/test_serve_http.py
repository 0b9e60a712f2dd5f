"""The Ray Serve app over real HTTP: serve_app/config.yaml deployed with Ray's REST API (what `serve deploy` does)
onto the session's real Ray head (`local_stack`), on a free loopback port, with the tiny-llama base.

What it proves: OpenAI chat (adapter and base) with httpx and the official `openai` client, streaming with usage and
`[DONE]`; `/v1/models`; LoRAX `/generate` + `/generate_stream`; adapters added to the local catalog or registered in
MLflow after start-up are servable without a restart; greedy answers equal the plain engine's (same text, usage
and finish reason; that engine's token ids equal PEFT's) even under concurrency with more adapters than the
replica keeps (multiplex LRU eviction); OpenAI-shaped 4xx for bad input and bad adapters while others keep serving;
Prometheus metrics with an `adapter` label on the head's metrics export port; and autoscaling 1 -> 2 -> 1 replicas
under a load ramp.

Run: `pytest tests/test_serve_http.py -q` (about 2.5-3.5 minutes on 2 cores, stack start-up included).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from bad_adapters import write_bad_adapters
from peft_reference import chat_ids, engine_greedy, peft_greedy
from serve_helpers import (
    app_config,
    deploy,
    http_client,
    is_ok,
    metric_totals,
    register_adapter,
    replicas,
    shutdown,
    sse_data,
    wait_for,
    wait_running,
)

from adapters.random_adapter import write_random_adapter
from serve_app.app_config import ServeAppConfig
from serve_app.engine import EngineConfig, LoraEngine
from serve_app.model_service import ModelService

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

APP, SCALE_APP = "lorafleet", "scale"
MAX_NEW = 10
PROMPTS = ["hi", "Tell me a story about a cat."]
ADAPTERS = {  # served from the catalog from the start: mixed ranks and targets
    "ad0": dict(rank=8, seed=0),
    "ad1": dict(rank=4, seed=1, targets=("q_proj", "v_proj")),
    "ad2": dict(rank=16, seed=2, use_rslora=True),
    "ad3": dict(rank=8, seed=3, targets=("gate_proj", "up_proj", "down_proj")),
    "ad4": dict(rank=2, seed=4),
}
LATE = {"late-local": dict(rank=8, seed=11), "late-mlflow": dict(rank=8, seed=12)}  # added after start-up
ENGINE = {"max_seq_len": 256, "max_loras": 4, "max_running": 16}


# --- helpers -----------------------------------------------------------------------------------------------------


def _chat(model: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_NEW,
            "temperature": 0, **extra}  # fmt: skip


# --- adapters, references -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dirs(tiny_shapes, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_random_adapter(root / name, tiny_shapes, **kw) for name, kw in {**ADAPTERS, **LATE}.items()}


@pytest.fixture(scope="module")
def catalog(adapter_dirs, tmp_path_factory) -> Path:
    """The local catalog the app starts with: good adapters plus three that must be refused per request."""
    root = tmp_path_factory.mktemp("catalog")
    for name in ADAPTERS:
        shutil.copytree(adapter_dirs[name], root / name)
    write_bad_adapters(root, adapter_dirs["ad0"])
    return root


@pytest.fixture(scope="module")
def expected(tiny_base, adapter_dirs) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, prompt) -> what the plain engine (ModelService, no Ray) answers: text, usage, finish reason. Checked
    against PEFT + HF generate run request by request: the engine's greedy token ids are PEFT's, the usage counts
    them, and the text is their decoding (minus trailing bytes that are no complete UTF-8 character, which the
    incremental detokenizer holds back). Keys: every model x PROMPTS (chat), and ("ad2", "hello") (plain text)."""
    tokenizer = tiny_base.tokenizer
    names = [*ADAPTERS, *LATE]
    config = ServeAppConfig(base_model="tiny-llama", mlflow_tracking_uri="", engine=EngineConfig(**ENGINE))
    cases: dict[tuple[str, str], tuple[dict[str, Any], list[int], str | None]] = {}
    for prompt in PROMPTS:
        for name in [None, *names]:
            payload = {"kind": "chat", "messages": [{"role": "user", "content": prompt}]}
            cases[(name or "tiny-llama", prompt)] = (payload, chat_ids(tokenizer, prompt), name)
    cases[("ad2", "hello")] = ({"kind": "text", "prompt": "hello"}, tokenizer("hello").input_ids, "ad2")

    requests = [(ids, name) for _, ids, name in cases.values()]
    engine = LoraEngine(tiny_base, config.engine)
    want = peft_greedy(tiny_base, {n: adapter_dirs[n] for n in names}, requests, MAX_NEW, engine.eos_ids)
    for name in names:
        engine.register_adapter(name, adapter_dirs[name])
    assert engine_greedy(engine, requests, MAX_NEW)[0] == want  # token for token, all requests in one batch

    service = ModelService(config, engine=LoraEngine(tiny_base, config.engine))

    async def answer(payload: dict[str, Any], adapter: str | None) -> dict[str, Any]:
        if adapter:
            await service.engine.load_adapter(adapter, adapter_dirs[adapter])
        events = [e async for e in service.generate({**payload, "max_tokens": MAX_NEW, "temperature": 0}, adapter)]
        assert events[0]["type"] == "start" and events[-1]["type"] == "end", events
        end = events[-1]
        text = "".join(e["text"] for e in events if e["type"] == "delta")
        return {"text": text, **{k: end[k] for k in ("finish_reason", "completion_tokens", "prompt_tokens")}}

    async def all_answers() -> dict[tuple[str, str], dict[str, Any]]:
        return {key: await answer(payload, name) for key, (payload, _, name) in cases.items()}

    try:
        answers = asyncio.run(all_answers())
    finally:
        service.engine.shutdown()
    for (key, (_, ids, _)), ids_want in zip(cases.items(), want, strict=True):
        got = answers[key]
        assert got["prompt_tokens"] == len(ids) and got["completion_tokens"] == len(ids_want), key
        assert got["finish_reason"] == ("length" if len(ids_want) == MAX_NEW else "stop"), key
        decoded = tokenizer.decode(ids_want, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert decoded.startswith(got["text"]) and set(decoded[len(got["text"]) :]) <= {"\ufffd"}, key
    assert len({answers[(m, PROMPTS[1])]["text"] for m in ["tiny-llama", *names]}) == len(names) + 1  # all differ
    return answers


# --- deployment --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_args(local_stack, catalog) -> dict[str, Any]:
    return {"base_model": "tiny-llama", "catalog_dir": str(catalog), "mlflow_tracking_uri": local_stack.mlflow_url,
            "registry_ttl_s": 1.0, "adapters_per_replica": 3, "engine": ENGINE}  # fmt: skip


@pytest.fixture(scope="module")
def apps(base_args) -> list[dict[str, Any]]:
    """The app under test (one model replica) and, for the autoscaling test, a second copy that scales 1..2
    replicas quickly (deployed together so both start while the references are computed)."""
    scaling = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
               "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2, "metrics_interval_s": 0.5}  # fmt: skip
    main = app_config(APP, "/", base_args, {"num_replicas": 1})
    scale = app_config(SCALE_APP, "/scale", {**base_args, "mlflow_tracking_uri": ""},
                       {"autoscaling_config": scaling, "graceful_shutdown_timeout_s": 5})  # fmt: skip
    return [main, scale]


@pytest.fixture(scope="module")
def url(request: pytest.FixtureRequest, local_stack, apps) -> Iterator[str]:
    """The apps deployed from config.yaml on the stack; Serve is shut down (REST DELETE) at the end."""
    try:
        deploy(local_stack, apps, wait=False)
        request.getfixturevalue("expected")  # computed while Serve starts the replicas
        wait_running(local_stack, [APP, SCALE_APP])
        with http_client() as http:
            wait_for("GET /health", lambda: is_ok(http, f"{local_stack.serve_url}/health"), 60)
        yield local_stack.serve_url
    finally:
        shutdown(local_stack)


# --- tests ---------------------------------------------------------------------------------------------------------


def test_chat_with_adapter_and_base_equals_the_plain_engine(url, expected) -> None:
    with http_client() as http:
        for model in ("ad0", "tiny-llama"):
            for prompt in PROMPTS:
                response = http.post(f"{url}/v1/chat/completions", json=_chat(model, prompt))
                assert response.status_code == 200, response.text
                body, want = response.json(), expected[(model, prompt)]
                assert body["object"] == "chat.completion" and body["model"] == model
                assert body["choices"][0]["message"] == {"role": "assistant", "content": want["text"], "refusal": None}
                assert body["choices"][0]["finish_reason"] == want["finish_reason"]
                assert body["usage"]["completion_tokens"] == want["completion_tokens"]
                assert body["usage"]["prompt_tokens"] == want["prompt_tokens"]


def test_openai_client_streaming_with_usage_and_done(url, expected) -> None:
    from openai import OpenAI

    with http_client() as http:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", http_client=http, max_retries=0)
        full = client.chat.completions.create(**_chat("ad1", PROMPTS[1]))
        chunks = list(client.chat.completions.create(**_chat("ad1", PROMPTS[1]), stream=True,
                                                     stream_options={"include_usage": True}))  # fmt: skip
        text = client.completions.create(model="ad3", prompt="hello", max_tokens=4, temperature=0)
        with http.stream("POST", f"{url}/v1/chat/completions", json=_chat("ad1", PROMPTS[1], stream=True)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = sse_data(r.iter_lines())
    want = expected[("ad1", PROMPTS[1])]
    assert full.choices[0].message.content == want["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want["completion_tokens"]
    assert text.object == "text_completion" and text.usage.completion_tokens == 4
    assert raw[-1] == "[DONE]" and len(raw) >= 3
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in raw[:-1]) == want["text"]


def test_models_lists_base_and_servable_catalog_adapters(url) -> None:
    with http_client() as http:
        ids = [m["id"] for m in http.get(f"{url}/v1/models").json()["data"]]
    assert ids[0] == "tiny-llama"
    assert set(ADAPTERS) <= set(ids) and not {"corrupt", "pickled"} & set(ids)


def test_lorax_generate_and_generate_stream(url, expected) -> None:
    params = {"adapter_id": "ad2", "max_new_tokens": MAX_NEW, "details": True}
    with http_client() as http:
        one = http.post(f"{url}/generate", json={"inputs": "hello", "parameters": params})
        with http.stream("POST", f"{url}/generate_stream", json={"inputs": "hello", "parameters": params}) as r:
            assert r.status_code == 200
            events = [json.loads(d) for d in sse_data(r.iter_lines())]
    want = expected[("ad2", "hello")]
    assert one.status_code == 200, one.text
    assert one.json()["generated_text"] == want["text"]
    assert one.json()["details"]["generated_tokens"] == want["completion_tokens"]
    assert one.json()["details"]["finish_reason"] == {"length": "length", "stop": "eos_token"}[want["finish_reason"]]
    assert all(set(e) == {"token", "generated_text", "details"} for e in events)
    assert all(set(e["token"]) == {"id", "text", "logprob", "special"} for e in events)
    assert "".join(e["token"]["text"] for e in events) == want["text"] == events[-1]["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == want["completion_tokens"]
    assert all(e["generated_text"] is None for e in events[:-1])


def test_adapter_added_to_local_catalog_after_start_is_served(url, catalog, adapter_dirs, expected) -> None:
    with http_client() as http:
        missing = http.post(f"{url}/v1/chat/completions", json=_chat("late-local", PROMPTS[1]))
        assert missing.status_code == 404 and "late-local" in missing.json()["error"]["message"]
        shutil.copytree(adapter_dirs["late-local"], catalog / "late-local")
        response = http.post(f"{url}/v1/chat/completions", json=_chat("late-local", PROMPTS[1]))
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected[("late-local", PROMPTS[1])]["text"]
        assert "late-local" in [m["id"] for m in http.get(f"{url}/v1/models").json()["data"]]


def test_adapter_registered_in_mlflow_after_start_is_served(url, local_stack, adapter_dirs, expected) -> None:
    name = f"late-mlflow-{uuid.uuid4().hex[:8]}"
    want = expected[("late-mlflow", PROMPTS[1])]["text"]
    with http_client() as http:
        missing = http.post(f"{url}/v1/chat/completions", json=_chat(name, PROMPTS[1]))
        assert missing.status_code == 404 and name in missing.json()["error"]["message"]

        version = register_adapter(local_stack.mlflow_url, "serve-http-test", name, adapter_dirs["late-mlflow"])

        def served() -> httpx.Response | None:  # the 404 above is cached for registry_ttl_s (1 s)
            response = http.post(f"{url}/v1/chat/completions", json=_chat(name, PROMPTS[1]))
            return response if response.status_code != 404 else None

        response = wait_for(f"{name} to be servable", served, 30)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == want
        for alias in (f"{name}/{version}", f"{name}@champion"):
            again = http.post(f"{url}/v1/chat/completions", json=_chat(alias, PROMPTS[1]))
            assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == want
        ids = [m["id"] for m in http.get(f"{url}/v1/models").json()["data"]]
        assert {name, f"{name}/{version}"} <= set(ids), ids


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        (b"{not json", 400, None, "not valid JSON"),
        ({"messages": HI}, 400, "model", "model"),
        ({"model": "ad0"}, 400, "messages", "messages"),
        ({"model": "ad0", "messages": HI, "max_tokens": 10**6}, 400, "max_tokens", "context limit"),
        ({"model": "ad0", "messages": [{"role": "user", "content": "x" * 3000}]}, 400, "messages", "context limit"),
        ({"model": "no-such-adapter", "messages": HI}, 404, "model", "no-such-adapter"),
        ({"model": "corrupt", "messages": HI}, 422, "model", "corrupt"),
        ({"model": "pickled", "messages": HI}, 422, "model", "pickle"),
        ({"model": "nan", "messages": HI}, 422, "model", "NaN"),
    ],
)
def test_bad_requests_get_openai_errors_and_others_keep_serving(url, expected, body, status, param, needle) -> None:
    with http_client() as http:
        if isinstance(body, bytes):
            response = http.post(f"{url}/v1/chat/completions", content=body,
                                 headers={"content-type": "application/json"})  # fmt: skip
        else:
            response = http.post(f"{url}/v1/chat/completions", json=body)
        good = http.post(f"{url}/v1/chat/completions", json=_chat("ad0", PROMPTS[0]))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"] and error["param"] == param, error
    assert (
        good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == expected[("ad0", "hi")]["text"]
    )


def test_concurrent_requests_for_many_adapters_with_eviction(url, expected) -> None:
    """18 requests at once for 5 adapters + the base, on a replica that keeps 3 adapters: every answer is the
    one that adapter gives alone."""
    models = ["tiny-llama", *ADAPTERS]
    cases = [(m, PROMPTS[(i + j) % 2]) for j in range(3) for i, m in enumerate(models)]

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(trust_env=False, timeout=120) as http:
            return await asyncio.gather(*(http.post(f"{url}/v1/chat/completions", json=_chat(m, p)) for m, p in cases))

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * len(cases), [r.text for r in responses if r.status_code != 200]
    got = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert got == [expected[case]["text"] for case in cases]


def test_prometheus_metrics_carry_the_adapter_label(url, local_stack) -> None:
    """Ray's metrics agent exports the replicas' counters (a few seconds late) on the head's metrics export port:
    requests by adapter name and status, and adapter events -- including the evictions of the concurrency test."""
    with http_client() as http:
        for _ in range(2):
            assert http.post(f"{url}/v1/chat/completions", json=_chat("ad4", "hi")).status_code == 200
        assert http.post(f"{url}/v1/chat/completions", json=_chat("corrupt", "hi")).status_code == 422
    metrics = f"http://127.0.0.1:{local_stack.ray_ports.metrics_export}/metrics"
    wanted = {("ad4", "ok"): 2, ("corrupt", "422"): 1, ("base", "ok"): 1, ("ad0", "ok"): 1}

    def counted() -> dict[tuple[str, ...], float] | None:
        totals = metric_totals(metrics, "ray_lorafleet_requests_total", ("adapter", "status"))
        return totals if all(totals.get(k, 0) >= n for k, n in wanted.items()) else None

    totals = wait_for("ray_lorafleet_requests_total{adapter=...} on the metrics export port", counted, 60, 2)
    assert not any(adapter.startswith(("local:", "mlflow:")) for adapter, _ in totals)  # names, not internal ids
    events = metric_totals(metrics, "ray_lorafleet_adapter_events_total", ("event",))
    assert events.get(("load",), 0) >= len(ADAPTERS) and events.get(("evict",), 0) >= 1, events
    assert events.get(("rejected",), 0) >= 3, events  # corrupt, pickled, nan
    versions = metric_totals(metrics, "ray_lorafleet_tokens_out_total", ("version",), adapter="ad4")
    assert [len(v) for (v,) in versions] == [8]  # the local catalog's content stamp


def test_autoscaling_up_under_load_and_back_down(url, local_stack) -> None:
    """The second app (autoscaling 1..2 replicas): 10 clients sending long requests for several adapters push it to
    2 replicas that both serve; when the load stops it goes back to 1. Every request succeeds meanwhile."""
    metrics = f"http://127.0.0.1:{local_stack.ray_ports.metrics_export}/metrics"

    def model_replicas() -> tuple[int, list[str]]:
        return replicas(local_stack, SCALE_APP, "LoraModel")

    def by_replica() -> dict[tuple[str, ...], float]:
        return metric_totals(metrics, "ray_serve_deployment_request_counter_total", ("replica",),
                             application=SCALE_APP, deployment="LoraModel")  # fmt: skip

    assert model_replicas() == (1, ["RUNNING"])
    stop, outcomes = threading.Event(), []
    models = ["tiny-llama", *ADAPTERS]  # several adapters, so multiplexed routing can use both replicas

    def load(worker: int) -> None:
        body = _chat(models[worker % len(models)], PROMPTS[1], max_tokens=200)
        with http_client(120) as http:
            while not stop.is_set():
                try:
                    outcomes.append(http.post(f"{url}/scale/v1/chat/completions", json=body).status_code)
                except httpx.HTTPError as err:
                    outcomes.append(repr(err))

    with ThreadPoolExecutor(max_workers=10) as pool:
        for worker in range(10):
            pool.submit(load, worker)
        try:
            wait_for("2 RUNNING replicas under load", lambda: model_replicas()[1].count("RUNNING") == 2, 150, 1)
            wait_for("both replicas serving", lambda: sum(n > 0 for n in by_replica().values()) == 2, 60, 2)
        finally:
            stop.set()
    assert outcomes and set(outcomes) == {200}, {o for o in outcomes if o != 200}
    wait_for("back to 1 replica after the load", lambda: model_replicas() == (1, ["RUNNING"]), 120, 1)
