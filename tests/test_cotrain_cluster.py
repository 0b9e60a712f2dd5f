"""`strategy: cotrain` as users run it: `ray job submit ... python -m jobs.sweep` on the session's real Ray head and
`mlflow server`, with the tiny model. Four adapters (2 tasks x 2 ranks) train in one Ray Train run over one base
copy, and each still gets its own MLflow run (params, step metrics, artifacts), its own registry version, and a
champion per task; a resubmission retrains nothing.

    pytest tests/test_cotrain_cluster.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from test_sweep_cluster import child_runs, client, submit, sweep_config

from cluster.stack_state import StackInfo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cotrain_sweep(local_stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path, config = sweep_config(tmp_path_factory.mktemp("cotrain"), local_stack, strategy="cotrain",
                                adapters_per_job=4, grid={"lora.r": [4, 8]})  # fmt: skip
    result = submit(local_stack, path)
    return {"path": path, "config": config, "result": result, "output": result.stdout + result.stderr}


def test_cotrain_sweep_trains_every_adapter_in_one_group(cotrain_sweep: dict[str, Any]) -> None:
    out = cotrain_sweep["output"]
    assert cotrain_sweep["result"].returncode == 0, out[-4000:]
    assert "4 adapters co-trained in 1 groups of at most 4" in out
    assert out.count("co-training ") == 1  # one Ray Train run for the whole group
    prefix = cotrain_sweep["config"]["mlflow"]["registry_prefix"]
    for task in cotrain_sweep["config"]["tasks"]:
        assert out.count(f"registered {prefix}{task} version") == 2


def test_each_cotrained_adapter_has_its_own_complete_mlflow_run(
    cotrain_sweep: dict[str, Any], local_stack: StackInfo, tmp_path: Path
) -> None:
    mlflow = client(local_stack)
    runs = child_runs(local_stack, cotrain_sweep["config"]["mlflow"]["experiment"])
    assert len(runs) == 4
    assert len({r.data.tags["cotrain_group"] for r in runs}) == 1
    assert sorted(r.data.params["lora.r"] for r in runs) == ["4", "4", "8", "8"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
        assert run.data.metrics["final_steps"] == 6
        files = {a.path for a in mlflow.list_artifacts(run.info.run_id, "adapter")}
        assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= files
        local = mlflow.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors", str(tmp_path))
        with safe_open(local, "pt") as weights:  # each artifact holds its own rank, not the group's padded one
            a_key = next(k for k in weights.keys() if ".lora_A." in k)
            assert weights.get_tensor(a_key).shape[0] == int(run.data.params["lora.r"])


def test_registry_versions_and_champions_and_a_resubmission_skips_all(
    cotrain_sweep: dict[str, Any], local_stack: StackInfo
) -> None:
    mlflow = client(local_stack)
    prefix = cotrain_sweep["config"]["mlflow"]["registry_prefix"]
    for task in cotrain_sweep["config"]["tasks"]:
        versions = mlflow.search_model_versions(f"name='{prefix}{task}'")
        assert sorted(v.tags["lora_r"] for v in versions) == ["4", "8"]
        best = max(versions, key=lambda v: (float(v.tags["adapter_score"]), int(v.version)))
        assert mlflow.get_model_version_by_alias(f"{prefix}{task}", "champion").version == best.version
    again = submit(local_stack, cotrain_sweep["path"])
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert (again.stdout + again.stderr).count("already trained and registered") == 4
    assert "co-training " not in again.stdout
    assert len(child_runs(local_stack, cotrain_sweep["config"]["mlflow"]["experiment"])) == 4
