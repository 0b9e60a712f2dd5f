"""The server-side per-request deadline (`request_timeout_s`): a generation that runs too long ends with a 504
(`deadline_exceeded`) — whole answers as the HTTP status, streams as a final SSE error event — and its engine slot
is freed, so the next request is served. The engine's decode step is slowed (a real engine, 50 ms a step)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from api_harness import build, client, write_catalog

HI = [{"role": "user", "content": "hi"}]


def test_overdue_requests_end_with_504_and_free_their_slot(tiny_base: Any, tiny_shapes: Any,
                                                          tmp_path: Path) -> None:  # fmt: skip
    catalog = write_catalog(tmp_path / "catalog", tiny_shapes, count=1)
    with build(tiny_base, catalog, request_timeout_s=0.6) as (app, service):
        runner = service.engine.engine.runner
        decode = runner.decode

        def slow_decode(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.05)
            return decode(*args, **kwargs)

        runner.decode = slow_decode
        long = {"model": "ad0", "messages": HI, "max_tokens": 200, "ignore_eos": True, "temperature": 0}

        async def go():
            async with client(app) as c:
                started = time.monotonic()
                whole = await c.post("/v1/chat/completions", json=long)
                took = time.monotonic() - started
                async with c.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as r:
                    frames = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
                lorax = await c.post(
                    "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
                )
                short = await c.post("/v1/chat/completions", json={**long, "max_tokens": 3})
                return whole, took, frames, lorax, short

        whole, took, frames, lorax, short = asyncio.run(go())
        assert whole.status_code == 504 and whole.json()["error"]["code"] == "deadline_exceeded", whole.text
        assert "0.6 s" in whole.json()["error"]["message"] and took < 5
        errors = [json.loads(f) for f in frames if f.startswith('{"error"')]
        assert len(errors) == 1 and errors[0]["error"]["code"] == "deadline_exceeded"
        assert frames[-1] == "[DONE]" and any('"content"' in f for f in frames[:-2])  # tokens came first
        assert lorax.status_code == 504
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
        assert not service.engine.engine.has_work()  # every slot freed


@pytest.mark.parametrize("value", [0, -1])
def test_deadline_must_be_positive(value: float) -> None:
    from pydantic import ValidationError

    from serve_app.app_config import ServeAppConfig

    with pytest.raises(ValidationError, match="request_timeout_s"):
        ServeAppConfig(request_timeout_s=value)
