"""MLflow as its users expect (issue 18 item 4), against a real `mlflow server` on a free loopback port:

- a finished adapter (`SweepTracker.finish_child`, as a sweep's trial calls it) registers a version whose source is
  an MLflow pyfunc model folder; `mlflow.pyfunc.load_model("models:/<task>@champion")` answers prompts and chat
  messages token for token like PEFT on the same base with the trained prompt built by hand here;
- `mlflow models serve --env-manager local` (a real process, stopped by PID) answers the same over HTTP;
- serving's registry source still finds the adapter files in that folder;
- the experiment is tagged so MLflow's UI opens on runs, the run has the plain comparable metrics, and the parent
  run holds the summary as an MLflow table and the leaderboard chart.

    .venv/bin/python -m pytest -q tests/test_mlflow_pyfunc.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.mlflow_pyfunc import PredictInputError, adapter_files_of, requests_of
from tests.mlflow_sweep import SYSTEM, mlflow_server, record_sweep

CHAT = [{"role": "user", "content": "The film was wonderful."}]
PROMPT = "Review: dull and slow\nSentiment:"
MAX_NEW = 6


# --- quick: input shapes and the model folder's layout ----------------------------------------------------------


def test_inputs_become_requests() -> None:
    import numpy as np
    import pandas as pd

    text, chat = {"kind": "text", "prompt": PROMPT}, {"kind": "chat", "messages": CHAT}
    assert requests_of(PROMPT) == [text]
    assert requests_of([PROMPT, CHAT, {"messages": CHAT}]) == [text, chat, chat]
    assert requests_of({"messages": CHAT, "max_tokens": 3}) == [chat]  # MLflow's chat body under `models serve`
    assert requests_of(CHAT) == [chat]  # one conversation, not two prompts
    assert requests_of(np.array([PROMPT])) == [text]
    assert requests_of(pd.DataFrame({"prompt": [PROMPT, PROMPT]})) == [text, text]
    assert requests_of(pd.DataFrame({"messages": [CHAT]})) == [chat]
    for bad in ([], [3], {"messages": [{"role": "user"}]}, pd.DataFrame({"a": [1], "b": [2]})):
        with pytest.raises(PredictInputError):
            requests_of(bad)


def test_adapter_files_stay_inside_the_model_folder(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert adapter_files_of(plain) == plain  # a version registered before pyfunc folders: the adapter itself
    model = tmp_path / "model"
    (model / "artifacts" / "adapter").mkdir(parents=True)
    spec = {"flavors": {"python_function": {"artifacts": {"adapter": {"path": "artifacts/adapter"}}}}}
    (model / "MLmodel").write_text(json.dumps(spec))  # JSON is YAML
    assert adapter_files_of(model) == (model / "artifacts" / "adapter").resolve()
    spec["flavors"]["python_function"]["artifacts"]["adapter"]["path"] = "../plain"
    (model / "MLmodel").write_text(json.dumps(spec))
    with pytest.raises(FileNotFoundError, match="not a folder inside the model"):
        adapter_files_of(model)


# --- slow: a real MLflow server, registry, pyfunc and `mlflow models serve` ------------------------------------


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-state")) as url:
        yield url


@pytest.fixture(scope="module")
def registered(mlflow_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_shapes) -> dict[str, Any]:
    """A finished sweep of two adapters; the tests look at the first (sentiment)."""
    sweep = record_sweep(mlflow_url, tmp_path_factory.mktemp("pyfunc"), tiny_shapes)
    return {**sweep, "run_id": sweep["runs"]["sentiment"], "version": sweep["versions"]["sentiment"],
            "adapter": sweep["adapters"]["sentiment"], "name": sweep["models"]["sentiment"]}  # fmt: skip


@pytest.fixture(scope="module")
def reference(registered: dict[str, Any]) -> tuple[str, str, str]:
    """PEFT on the tiny base, the trained system prompt put in by hand: (chat answer, prompt answer, base's chat)."""
    import torch
    from peft import PeftModel

    from adapters.base_models import load_base

    base = load_base("tiny-llama")
    tok = base.tokenizer
    chat = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, *CHAT], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    chat_ids = tok(chat, add_special_tokens=False).input_ids
    prompt_ids = tok(PROMPT, add_special_tokens=True).input_ids

    def run(model: Any, ids: list[int]) -> str:
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        return tok.decode(out[0, x.shape[1] :], skip_special_tokens=True)

    plain = run(base.model, chat_ids)
    model = PeftModel.from_pretrained(base.model, str(registered["adapter"])).eval()
    return run(model, chat_ids), run(model, prompt_ids), plain


@pytest.mark.slow
def test_the_run_and_experiment_are_what_the_ui_compares(registered: dict[str, Any], mlflow_url: str) -> None:
    import mlflow

    client = registered["tracker"].client.raw
    run = client.get_run(registered["run_id"])
    m = run.data.metrics
    assert (m["adapter_score"], m["base_score"], m["delta"]) == (30.0, 10.0, 20.0)
    assert (m["train_loss"], m["train_tokens_per_s"], m["train_seconds"], m["epochs"]) == (1.5, 900.0, 4.0, 0.5)
    assert [h.step for h in client.get_metric_history(run.info.run_id, "delta")] == [6]  # logged once
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = registered["parent"]
    mlflow.set_tracking_uri(mlflow_url)
    table = client.load_table(experiment.experiment_id, "summary_table.json", run_ids=[parent])
    assert list(table["adapter"]) == ["sentiment", "date_normalisation"] and list(table["delta"]) == [20.0, 30.0]
    assert client.get_run(parent).data.metrics["best_delta"] == 30.0
    assert "leaderboard.png" in {a.path for a in client.list_artifacts(parent)}
    assert client.list_artifacts(parent, "images")  # the chart as an image the chart view shows


@pytest.mark.slow
def test_registered_version_loads_as_pyfunc_and_answers_like_peft(
    registered: dict[str, Any], reference: tuple[str, str, str], mlflow_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from adapters.sources.mlflow_registry import MlflowRegistry

    name, client = registered["name"], registered["tracker"].client.raw
    version = client.get_model_version_by_alias(name, "champion")
    assert version.version == registered["version"] and version.source.endswith("/model")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    chat, prompt, plain = reference
    assert chat != plain  # the adapter is applied (and changes the answer)
    params = {"max_new_tokens": MAX_NEW}
    assert model.predict({"messages": CHAT, "max_tokens": MAX_NEW}) == [chat]
    assert model.predict([CHAT, PROMPT], params=params) == [chat, prompt]
    registry = MlflowRegistry(mlflow_url)
    folder = registry.fetch(registry.resolve(f"{name}@champion"))  # serving still finds the adapter files
    for file in ("adapter_model.safetensors", "adapter_config.json", "lorafleet_prompt.json"):
        assert (folder / file).read_bytes() == (registered["adapter"] / file).read_bytes()


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_answers(registered: dict[str, Any], reference: tuple[str, str, str], mlflow_url: str,
                                     tmp_path: Path, port_picker: Callable[[int], list[int]]) -> None:  # fmt: skip
    port = port_picker(1)[0]
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    # as from an activated venv: `mlflow models serve` execs `uvicorn` by name
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([mlflow_cli, "models", "serve", "-m", f"models:/{registered['name']}@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        chat, prompt, _ = reference
        status, body = _post(f"{url}/invocations", {"inputs": [PROMPT], "params": {"max_new_tokens": MAX_NEW}})
        assert status == 200 and body == {"predictions": [prompt]}, body
        status, body = _post(f"{url}/invocations", {"messages": CHAT, "max_tokens": MAX_NEW})
        assert status == 200 and body == [chat], body  # MLflow answers its chat body unwrapped
        status, body = _post(f"{url}/invocations", {"inputs": [3]})
        assert status in (400, 500) and "expected a prompt string" in json.dumps(body), body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
