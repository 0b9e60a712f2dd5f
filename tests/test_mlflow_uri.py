"""One rule picks the MLflow for sweeps, Serve and the CLI (cluster/mlflow_uri.py): explicit value, then
$MLFLOW_TRACKING_URI, then the running local stack, then the caller's fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster.mlflow_uri import local_stack_mlflow, resolve_mlflow_uri
from cluster.stack_state import STACK_FILE, StackInfo
from jobs.config import MlflowSettings
from serve_app.app_config import ServeAppConfig


def test_explicit_then_environment_then_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_STATE_DIR", str(tmp_path / "no-stack"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_mlflow_uri("http://a:1") == "http://a:1"
    assert resolve_mlflow_uri("", "http://fallback") is None  # "" = no MLflow, even with a fallback
    assert resolve_mlflow_uri(None, "http://fallback") == "http://fallback"
    assert MlflowSettings().uri() == "http://127.0.0.1:5000" and ServeAppConfig().resolved_mlflow_uri() is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:2")
    assert resolve_mlflow_uri(None, "http://fallback") == "http://env:2"
    assert MlflowSettings().uri() == "http://env:2" and ServeAppConfig().resolved_mlflow_uri() == "http://env:2"
    assert ServeAppConfig(mlflow_tracking_uri="").resolved_mlflow_uri() is None


@pytest.mark.slow
def test_the_running_local_stack_is_found_and_a_dead_one_is_not(
    local_stack: StackInfo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LORAFLEET_STATE_DIR", local_stack.state_dir)
    assert local_stack_mlflow() == local_stack.mlflow_url
    assert MlflowSettings().uri() == local_stack.mlflow_url
    assert ServeAppConfig().resolved_mlflow_uri() == local_stack.mlflow_url
    dead = tmp_path / "dead"  # the same record, but its MLflow process id is no longer the recorded process
    dead.mkdir()
    shutil.copy(Path(local_stack.state_dir) / STACK_FILE, dead / STACK_FILE)
    record = json.loads((dead / STACK_FILE).read_text())
    record["mlflow"]["create_time"] = 1.0
    (dead / STACK_FILE).write_text(json.dumps(record))
    assert local_stack_mlflow(dead) is None
