"""The main job end to end, reduced: `python -m cluster.demo` (what `make demo` runs) on its own local stack with
the bundled SmolLM2-135M and one task for a few steps: sweep via `ray job submit` -> MLflow registry -> `serve
deploy` -> HTTP requests. Then checks, over HTTP, that the adapter's answers come from the adapter (they differ from
the base model's and score better), and that re-running the demo reuses everything (no duplicate registration).

    pytest tests/test_main_job.py        # ~6 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_ports

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TASK = "date_normalisation"
DEMO_ARGS = ["--tasks", TASK, "--set", "training.max_steps=24", "--set", "evaluation.max_examples=20"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("demo-stack")
    gcs, dashboard, mlflow, serve = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    up = [str(BIN / "lorafleet"), "up", "--state-dir", str(state), "--ray-port", str(gcs), "--dashboard-port",
          str(dashboard), "--mlflow-port", str(mlflow), "--serve-port", str(serve), "--num-cpus", "4"]  # fmt: skip
    started = subprocess.run(up, capture_output=True, text=True, timeout=300, env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    info = {"state": state, "dashboard": f"http://127.0.0.1:{dashboard}", "serve_port": serve, "env": env,
            "mlflow": f"http://127.0.0.1:{mlflow}"}  # fmt: skip
    try:
        yield info
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-a", info["dashboard"], "-y"], capture_output=True,
                       timeout=120, env=env)  # fmt: skip
        subprocess.run([str(BIN / "lorafleet"), "down", "--state-dir", str(state)], capture_output=True, timeout=180)


def run_demo(stack: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cluster.demo", "--state-dir", str(stack["state"]), "--serve-port",
               str(stack["serve_port"]), *DEMO_ARGS]  # fmt: skip
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200, env=stack["env"])


@pytest.fixture(scope="module")
def first_demo(stack: dict) -> subprocess.CompletedProcess:
    return run_demo(stack)


def chat(stack: dict, model: str, messages: list[dict]) -> str:
    body = json.dumps({"model": model, "messages": messages, "max_tokens": 24, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{stack['serve_port']}/v1/chat/completions", body,
                                     {"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"].strip()


def test_demo_runs_sweep_registry_serve_and_requests(first_demo: subprocess.CompletedProcess) -> None:
    out = first_demo.stdout + first_demo.stderr
    assert first_demo.returncode == 0, out[-5000:]
    assert f"registered {TASK} version 1" in out
    assert "adapter answer" in out and "base answer" in out  # the side-by-side table
    assert "MLflow UI http://127.0.0.1:" in out


def test_served_adapter_answers_differ_from_the_base_and_score_better(stack: dict, first_demo) -> None:
    from jobs.tasks import get_task, load_split

    assert first_demo.returncode == 0
    task = get_task(TASK)
    rows = load_split(TASK, "eval")[20:30]  # rows the sweep's evaluation did not look at
    # Only the user's text, as a client would send it: the adapter is served with the system prompt it was trained
    # with (its lorafleet_prompt.json), the bare base gets exactly what was sent.
    adapter = [chat(stack, TASK, [{"role": "user", "content": r["input"]}]) for r in rows]
    base = [chat(stack, "smollm2-135m", [{"role": "user", "content": r["input"]}]) for r in rows]
    assert sum(a != b for a, b in zip(adapter, base, strict=True)) >= 8
    adapter_score = sum(task.score(a, r["output"]) for a, r in zip(adapter, rows, strict=True))
    base_score = sum(task.score(b, r["output"]) for b, r in zip(base, rows, strict=True))
    assert adapter_score >= base_score + 3, (adapter, base)


def test_rerunning_the_demo_reuses_what_exists(stack: dict, first_demo) -> None:
    from mlflow import MlflowClient

    assert first_demo.returncode == 0
    again = run_demo(stack)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-5000:]
    assert "already trained and registered" in out
    versions = MlflowClient(stack["mlflow"], registry_uri=stack["mlflow"]).search_model_versions(f"name='{TASK}'")
    assert len(versions) == 1
