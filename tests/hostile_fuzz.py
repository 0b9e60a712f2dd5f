"""Helpers for tests/test_hostile_input.py (not a test module): an in-process API harness over the tiny Llama,
hypothesis strategies for hostile request bodies, and an oracle saying which bodies the API must refuse.

The oracle is conservative and independent of the API's pydantic schemas: `must_refuse(endpoint, body)` is True
only for bodies that break a documented rule (wrong JSON shape, unknown model, out-of-range or non-finite number,
oversized stop list, ...). A 2xx answer to such a body is a bug; any body may get a 4xx, none a 5xx.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from hypothesis import strategies as st

from adapters.lora_files import BaseShapes
from adapters.random_adapter import write_random_adapter
from serve_app.api import create_api
from serve_app.api_schemas import MAX_STOP, MAX_STOP_LEN
from serve_app.app_config import ServeAppConfig
from serve_app.engine import EngineConfig, LoraEngine
from serve_app.model_service import LocalBackend, ModelService

BASE = "tiny-llama"
ADAPTERS = ("ad0", "ad1")
SERVABLE = (BASE, *ADAPTERS)
MAX_SEQ_LEN = 256
KEY_ENV = "LORAFLEET_HOSTILE_TEST_KEY"  # never set globally: the API-key test sets it for its own app only
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream")


def write_catalog(root: Path, shapes: BaseShapes) -> Path:
    for i, name in enumerate(ADAPTERS):
        write_random_adapter(root / name, shapes, rank=8, seed=i)
    return root


def make_config(catalog: Path, **engine: Any) -> ServeAppConfig:
    return ServeAppConfig(base_model=BASE, catalog_dir=str(catalog), mlflow_tracking_uri="", default_max_tokens=4,
                          api_key_env=KEY_ENV, engine=EngineConfig(max_seq_len=MAX_SEQ_LEN, max_loras=2, **engine))  # fmt: skip


class Harness:
    """One engine + API app, driven from one private event loop (so hypothesis tests can stay synchronous)."""

    def __init__(self, base: Any, catalog: Path, **engine: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.config = make_config(catalog, **engine)
        self.service = ModelService(self.config, engine=LoraEngine(base, self.config.engine))
        self.backend = LocalBackend(self.service, max_adapters=2)
        self.app = create_api(self.backend, self.service.registry, self.service.base_name, self.config)
        self.client = self.client_for(self.app)
        self.statuses: Counter[int] = Counter()  # of the generated (property-based) requests
        self.baseline_rss = 0  # bytes, set after warm-up

    @staticmethod
    def client_for(app: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def post(self, path: str, body: Any = None, content: bytes | None = None, **kw: Any) -> httpx.Response:
        if content is None:
            content = json.dumps(body, allow_nan=True).encode()  # NaN / Infinity go out as raw JSON tokens
        headers = {"content-type": "application/json", **kw.pop("headers", {})}
        return self.run(self.client.post(path, content=content, headers=headers, **kw))

    def close(self) -> None:
        self.run(self.client.aclose())
        self.service.engine.shutdown()
        self.loop.close()


def check_error(response: httpx.Response) -> dict[str, Any]:
    """A 4xx must carry an OpenAI-shaped error; returns its `error` object."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"].strip(), response.text
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["type"], str), response.text
    if response.status_code == 429:
        assert response.headers.get("retry-after"), "429 without Retry-After"
    return error


def check_success(path: str, body: dict[str, Any], response: httpx.Response) -> None:
    """A 2xx has the shape its endpoint promises (JSON, or SSE frames ending as the protocol says)."""
    if response.headers["content-type"].startswith("text/event-stream"):
        # SSE lines end at \n (or \r\n) only: str.splitlines() would also cut at U+0085 / U+2028 inside the JSON text
        frames = [line[6:].rstrip("\r") for line in response.text.split("\n") if line.startswith("data: ")]
        assert frames and not any('"error"' in f[:12] for f in frames), response.text[:500]
        if path == "/generate_stream":
            assert json.loads(frames[-1])["details"]["finish_reason"], frames[-1]
        else:
            assert frames[-1] == "[DONE]", frames[-3:]
        return
    data = response.json()
    if path.startswith("/v1/"):
        assert data["model"] == body["model"] and data["usage"]["completion_tokens"] >= 0 and data["choices"]
    else:
        assert isinstance(data["generated_text"], str)


# -- the oracle ------------------------------------------------------------------------------------------------
# field -> (integer?, low, high, null allowed?, low exclusive?)
_NUMBERS: dict[str, tuple[bool, float, float, bool, bool]] = {
    "max_tokens": (True, 1, MAX_SEQ_LEN - 1, True, False),
    "max_new_tokens": (True, 1, MAX_SEQ_LEN - 1, True, False),  # lorax-client sends null
    "max_completion_tokens": (True, 1, math.inf, True, False),
    "seed": (True, 0, 2**63 - 1, True, False),
    "n": (True, 1, 16, False, False),
    "top_p": (False, 0, 1, False, True),
}


def _bad_number(name: str, value: Any, temperature_max: float) -> bool:
    integer, low, high, nullable, exclusive = _NUMBERS.get(name, (False, 0, temperature_max, False, False))
    if value is None:
        return not nullable
    if isinstance(value, bool) or isinstance(value, str):
        return False  # pydantic's lax mode may coerce these: no verdict
    if not isinstance(value, int | float):
        return True
    if not math.isfinite(value) or (integer and value != int(value)):
        return True
    return value < low or value > high or (exclusive and value == low)


def _bad_stop(stop: Any, allow_str: bool) -> bool:
    if stop is None:
        return not allow_str
    items = [stop] if isinstance(stop, str) and allow_str else stop
    if not isinstance(items, list) or len(items) > MAX_STOP:
        return True
    return any(not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_LEN for s in items)


def _bad_messages(messages: Any) -> bool:
    if not isinstance(messages, list) or not messages:
        return True
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            return True
        content = m.get("content")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):  # fmt: skip
                return True
        elif not isinstance(content, str):
            return True
    return False


def must_refuse(path: str, body: Any) -> bool:
    if not isinstance(body, dict):
        return True
    if path.startswith("/v1/"):
        if not isinstance(body.get("model"), str) or body["model"] not in SERVABLE:
            return True
        if path == "/v1/chat/completions" and _bad_messages(body.get("messages")):
            return True
        if path == "/v1/completions":
            prompt = body.get("prompt")
            prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
            if not isinstance(prompt, str) or not prompt:
                return True
        if "stop" in body and _bad_stop(body["stop"], allow_str=True):
            return True
        if isinstance(body.get("stream"), list | dict) or not isinstance(body.get("stream_options", {}), dict | None):
            return True
        return any(_bad_number(k, body[k], 2.0) for k in (*_NUMBERS, "temperature") if k in body)
    params = body.get("parameters", {})
    if not isinstance(body.get("inputs"), str) or not body["inputs"] or not isinstance(params, dict):
        return True
    adapter = params.get("adapter_id")
    if adapter is not None and (not isinstance(adapter, str) or adapter not in SERVABLE):
        return True
    if "stop" in params and _bad_stop(params["stop"], allow_str=False):
        return True
    numbers = [k for k in ("max_new_tokens", "seed") if k in params]
    if any(_bad_number(k, params[k], 100.0) for k in numbers):
        return True
    return any(params.get(k) is not None and _bad_number(k, params[k], 100.0) for k in ("temperature", "top_p"))


# -- strategies ------------------------------------------------------------------------------------------------
HOSTILE_IDS = ["../../etc/passwd", "/etc/passwd", "..", ".", "ad0/../ad1", "../ad0", "..%2f..%2fetc%2fpasswd",
               "http://x/y", "https://evil.example/adapter", "s3://bucket/key", "file:///etc/passwd",
               "hf://org/model", "C:\\Windows\\win.ini", "~/.ssh/id_rsa", "ad0\n", " ad0", "ad0\x00", "AD0",
               "ad0@champion", "ad0/1", "local:ad0:deadbeef", "mlflow:ad0/1", "\ud800", "🦙" * 40, "a" * 257,
               "a" * 5000, "", "$(reboot)", "ad0;ls", "ad0' OR '1'='1"]  # fmt: skip
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
junk = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=6)  # fmt: skip
numbers = st.one_of(
    st.integers(-5, 40), st.integers(-(2**70), 2**70), st.floats(),
    st.sampled_from([0, -1, 2**63, 2**64, 10**30, 1e308, math.nan, math.inf, -math.inf, 1e-300, 5e-324, -0.0]),
    junk,
)  # fmt: skip
models = st.one_of(st.sampled_from(SERVABLE), st.sampled_from(HOSTILE_IDS), st.text(max_size=40),
                   st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@/:-]{0,30}", fullmatch=True), junk)  # fmt: skip
stops = st.one_of(st.text(max_size=8), st.lists(st.text(max_size=6), max_size=20), st.just(["x"] * 3000),
                  st.just("s" * 300), junk)  # fmt: skip
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool", "wizard", "USER", ""]), junk)
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "TEXT"]),
                                        "text": st.one_of(st.text(max_size=8), junk)}), max_size=3)  # fmt: skip
message = st.one_of(st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=16), parts, junk)},
                                          optional={"name": junk}), junk)  # fmt: skip
extra = st.dictionaries(st.text(max_size=10), junk, max_size=3)


def _merge(fields: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
    return {**extras, **fields}


def _fields(path: str) -> dict[str, st.SearchStrategy[Any]]:
    """The keys an endpoint reads (LoRAX: those of `parameters`, plus `inputs`), each holding anything."""
    if path.startswith("/v1/"):
        keys = {"model": models, "max_tokens": numbers, "temperature": numbers, "top_p": numbers, "seed": numbers,
                "n": numbers, "stop": stops, "stream": st.one_of(st.booleans(), junk),
                "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk)}  # fmt: skip
        return keys | ({"messages": st.one_of(st.lists(message, max_size=3), junk), "max_completion_tokens": numbers}
                       if path == "/v1/chat/completions" else {"prompt": st.one_of(st.text(max_size=16), junk)})  # fmt: skip
    return {"adapter_id": models, "max_new_tokens": numbers, "temperature": numbers, "top_p": numbers, "seed": numbers,
            "do_sample": st.one_of(st.booleans(), junk), "stop": stops, "details": st.booleans(),
            "return_full_text": st.booleans(), "inputs": st.one_of(st.text(max_size=16), junk)}  # fmt: skip


def fuzz_body(path: str) -> st.SearchStrategy[Any]:
    """Dicts with the endpoint's keys (any subset) holding anything, plus extra keys; or any JSON at all."""
    keys = _fields(path)
    if path.startswith("/v1/"):
        structured = st.fixed_dictionaries({}, optional=keys)
    else:
        inputs = keys.pop("inputs")
        params = st.one_of(st.fixed_dictionaries({}, optional=keys), junk)
        structured = st.fixed_dictionaries({}, optional={"inputs": inputs, "parameters": params})
    return st.one_of(st.builds(_merge, structured, extra), structured, junk)


def mutated_body(path: str) -> st.SearchStrategy[dict[str, Any]]:
    """A valid request with one field replaced by anything: reaches the checks behind schema validation (model
    resolution, the engine's context limit, sampling) far more often than fully random bodies."""

    def mutate(body: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
        body = copy.deepcopy(body)
        (body if path.startswith("/v1/") or key == "inputs" else body["parameters"])[key] = value
        return body

    return st.one_of([st.builds(mutate, valid_body(path), st.just(k), v) for k, v in _fields(path).items()])


short_text = st.text(max_size=8)


def valid_body(path: str) -> st.SearchStrategy[dict[str, Any]]:
    """Requests that must succeed (200): a servable model, short prompts, small limits."""
    stop_list = st.lists(st.text(min_size=1, max_size=5), max_size=3)
    if path.startswith("/v1/"):
        optional = {"max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True),
                    "seed": st.integers(0, 2**63 - 1), "stop": stop_list, "stream": st.booleans()}  # fmt: skip
        if path == "/v1/chat/completions":
            msgs = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                                   "content": short_text}), min_size=1, max_size=2)  # fmt: skip
            required = {"model": st.sampled_from(SERVABLE), "messages": msgs}
        else:
            required = {"model": st.sampled_from(SERVABLE), "prompt": st.text(min_size=1, max_size=8)}
        return st.fixed_dictionaries(required, optional=optional)
    params = {"adapter_id": st.sampled_from(SERVABLE), "temperature": st.floats(0, 100),
              "top_p": st.floats(0, 1, exclude_min=True), "do_sample": st.booleans(), "seed": st.integers(0, 2**63 - 1),
              "stop": stop_list, "details": st.booleans(), "return_full_text": st.booleans()}  # fmt: skip
    return st.fixed_dictionaries({"inputs": st.text(min_size=1, max_size=8),
                                  "parameters": st.fixed_dictionaries({"max_new_tokens": st.integers(1, 4)},
                                                                      optional=params)})  # fmt: skip


def mangled_bytes() -> st.SearchStrategy[bytes]:
    """Raw bodies: random bytes, and valid JSON cut short or with bytes flipped (often invalid UTF-8)."""
    doc = b'{"model": "ad0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    cut = st.integers(0, len(doc)).map(lambda i: doc[:i])
    flipped = st.tuples(st.integers(0, len(doc) - 1), st.integers(128, 255)).map(
        lambda t: doc[: t[0]] + bytes([t[1]]) + doc[t[0] + 1 :]
    )
    return st.one_of(st.binary(max_size=64), cut, flipped)
