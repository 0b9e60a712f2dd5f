"""vLLM's runtime adapter API on the real Ray Serve app: serve_app/config.yaml deployed (Ray's REST API, as `serve
deploy` does) onto the session's Ray head (`local_stack`) with `allow_runtime_lora_updating: true` and two LoraModel
replicas, each taking one request at a time (`max_ongoing_requests: 1`) so Serve's multiplexed routing has to send
a burst for one adapter to both of them.

What it proves: an adapter registered in MLflow is loaded by `models:/<name>@champion` under a new name; that name
is listed by /v1/models on every call (also through the official `openai` client) and answers on both model
replicas (Serve's per-replica request counters grow on both during the burst) with the same greedy text as the
same weights served from the catalog; a stream running on the name when it is unloaded ends normally; after the
unload it is gone from /v1/models and a new request gets 404.

Run: `pytest tests/test_dynamic_adapters_serve.py -q` (about 2 minutes on 2 cores, stack start-up included).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import (
    app_config,
    deploy,
    http_client,
    is_ok,
    metric_totals,
    register_adapter,
    replicas,
    shutdown,
    wait_for,
)

from adapters.random_adapter import write_random_adapter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

APP = "dynlora"
HI = [{"role": "user", "content": "Tell me a story about a cat."}]
BURST, BURST_TOKENS = 6, 200
METRICS_PERIOD_S = 12  # longer than Ray's metrics report interval


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": HI, "max_tokens": 10, "temperature": 0, **extra}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_shapes, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dyn-serve")
    catalog = root / "catalog"
    write_random_adapter(catalog / "ad0", tiny_shapes, rank=8, seed=0)
    write_random_adapter(catalog / "ad1", tiny_shapes, rank=4, seed=1, targets=("q_proj", "v_proj"))
    shutil.copytree(catalog / "ad1", root / "for-mlflow")
    return {"catalog": catalog, "mlflow": root / "for-mlflow"}


@pytest.fixture(scope="module")
def registered(local_stack, adapter_dirs) -> str:
    """A copy of ad1 registered in the stack's MLflow with alias champion; its registered-model name."""
    name = f"dyn-{uuid.uuid4().hex[:8]}"
    register_adapter(local_stack.mlflow_url, "dynamic-adapters-test", name, adapter_dirs["mlflow"])
    return name


@pytest.fixture(scope="module")
def url(local_stack, adapter_dirs) -> Iterator[str]:
    args = {"base_model": "tiny-llama", "catalog_dir": str(adapter_dirs["catalog"]), "registry_ttl_s": 1.0,
            "mlflow_tracking_uri": local_stack.mlflow_url, "allow_runtime_lora_updating": True,
            "engine": {"max_seq_len": 256, "max_loras": 2, "max_running": 4}}  # fmt: skip
    model = {"num_replicas": 2, "max_ongoing_requests": 1, "graceful_shutdown_timeout_s": 5}
    try:
        deploy(local_stack, [app_config(APP, "/", args, model)])
        assert replicas(local_stack, APP, "LoraModel") == (2, ["RUNNING", "RUNNING"])
        with http_client() as http:
            wait_for("GET /health", lambda: is_ok(http, f"{local_stack.serve_url}/health"), 60)
        yield local_stack.serve_url
    finally:
        shutdown(local_stack)


def test_load_serve_on_both_replicas_unload_everywhere(url, local_stack, registered) -> None:
    from openai import OpenAI

    metrics = f"http://127.0.0.1:{local_stack.ray_ports.metrics_export}/metrics"

    def by_replica() -> dict[tuple[str, ...], float]:
        return metric_totals(metrics, "ray_serve_deployment_request_counter_total", ("replica",),
                             application=APP, deployment="LoraModel")  # fmt: skip

    with http_client(120) as http:
        want = http.post(f"{url}/v1/chat/completions", json=_chat("ad1"))
        assert want.status_code == 200, want.text
        text = want.json()["choices"][0]["message"]["content"]
        assert text != http.post(f"{url}/v1/chat/completions", json=_chat("ad0")).json()["choices"][0]["message"]

        load = http.post(f"{url}/v1/load_lora_adapter",
                         json={"lora_name": "hot", "lora_path": f"models:/{registered}@champion"})  # fmt: skip
        assert load.status_code == 200 and load.text == "Success: LoRA adapter 'hot' added successfully."
        for _ in range(4):
            cards = {m["id"]: m for m in http.get(f"{url}/v1/models").json()["data"]}
            assert cards["hot"]["lorafleet"]["adapter_id"] == f"mlflow:{registered}/1", cards.get("hot")
        openai = OpenAI(base_url=f"{url}/v1", api_key="unused", http_client=http_client(120))
        assert "hot" in [m.id for m in openai.models.list()]

        answer = http.post(f"{url}/v1/chat/completions", json=_chat("hot"))
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == text

        def settled() -> dict[tuple[str, ...], float] | None:  # exported a few seconds late: wait until stable
            first = by_replica()
            time.sleep(METRICS_PERIOD_S)
            return first if first and by_replica() == first else None

        before = wait_for("the replicas' request counters to settle", settled, 120, 0)
        long = _chat("hot", max_tokens=BURST_TOKENS, ignore_eos=True)
        with ThreadPoolExecutor(BURST) as pool:
            burst = list(pool.map(lambda _: http.post(f"{url}/v1/chat/completions", json=long), range(BURST)))
        assert [r.status_code for r in burst] == [200] * BURST, [r.text for r in burst if r.status_code != 200]
        assert len({r.json()["choices"][0]["message"]["content"] for r in burst}) == 1
        assert all(r.json()["usage"]["completion_tokens"] == BURST_TOKENS for r in burst)

        def both_grew() -> bool:
            after = by_replica()
            return len(after) == 2 and all(after[k] > before.get(k, 0) for k in after)

        wait_for("both LoraModel replicas to have served the loaded name", both_grew, 60, 2)

        stream_body = _chat("hot", max_tokens=200, ignore_eos=True, stream=True)
        with http.stream("POST", f"{url}/v1/chat/completions", json=stream_body) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: ") and '"content"' in line)
            unload = http.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "hot"})
            rest = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        assert unload.status_code == 200 and unload.text == "Success: LoRA adapter 'hot' removed successfully."
        assert rest[-1] == "[DONE]" and "error" not in "".join(rest)
        finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, rest[:-1]) if c["choices"]]
        assert finishes[-1] == "length"

        for _ in range(4):
            assert "hot" not in [m["id"] for m in http.get(f"{url}/v1/models").json()["data"]]
        assert "hot" not in [m.id for m in openai.models.list()]
        gone = http.post(f"{url}/v1/chat/completions", json=_chat("hot"))
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found", gone.text
        still = http.post(f"{url}/v1/chat/completions", json=_chat(f"{registered}@champion"))
        assert still.status_code == 200 and still.json()["choices"][0]["message"]["content"] == text
