"""Sweeps as users run them: `ray job submit ... python -m jobs.sweep` against a real local Ray head and a real
`mlflow server` (the session's `local_stack`), on the tiny random Llama so each job takes about a minute.

    pytest tests/test_sweep_cluster.py

Checks what a user reads back through the MLflow client (runs, params, tags, step metrics, artifacts, registry
versions and the champion alias), that adapters train concurrently, that a resubmitted sweep skips finished work,
that a killed training worker resumes from its checkpoint inside the same MLflow run, and that bad input stops the
job with one line before anything reaches MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.stack_state import StackInfo

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def user_task(folder: Path) -> dict[str, Any]:
    """A task of the user's own (prompt/completion JSONL, metric choice, a seeded eval split): the sweep tests run
    it next to a bundled task, so grids, co-training, resume and the registry are checked for both kinds."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "triage.jsonl"
    issues = {"billing": ["charged twice", "refund please", "wrong invoice", "card billed"],
              "bug": ["app crashes", "error 500", "page blank", "sync broken"]}  # fmt: skip
    rows = [{"prompt": f"Ticket #{n}: {text}\nTeam:", "completion": f" {team}"}
            for n in range(5) for team, texts in issues.items() for text in texts]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": str(path), "eval_fraction": 0.25, "metric": {"name": "choice", "labels": ["billing", "bug"]}}


def sweep_config(tmp_path: Path, stack: StackInfo, **overrides: Any) -> tuple[Path, dict[str, Any]]:
    """A tiny-model sweep with its own experiment and registry prefix (the stack's MLflow is shared by tests), on
    one bundled task and one user task."""
    tag = uuid.uuid4().hex[:8]
    config: dict[str, Any] = {
        "name": f"t{tag}",
        "base_model": "tiny-llama",
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "max_steps": 6,
            "micro_batch_size": 4,
            "max_seq_len": 512,
            "log_every": 1,
            "checkpoint_every": 3,
        },  # fmt: skip
        "evaluation": {"max_examples": 6, "max_new_tokens": 4, "batch_size": 12},
        "tasks": {"sentiment": "bundled", "triage": user_task(tmp_path / "data")},
        "resources": {"workers_per_adapter": 1, "cpus_per_worker": 1},
        "max_concurrent_trials": 2,
        "storage_path": str(tmp_path / "runs"),
        "mlflow": {"tracking_uri": stack.mlflow_url, "experiment": f"exp-{tag}", "registry_prefix": f"t{tag}-"},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            config[section] = {**config.get(section, {}), field: value}
        else:
            config[key] = value
    path = tmp_path / f"sweep-{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def submit(stack: StackInfo, config_path: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [RAY, "job", "submit", "--address", stack.dashboard_url, "--runtime-env", "cluster/runtime_env.yaml",
               *extra, "--", "python", "-m", "jobs.sweep", "--config", str(config_path)]  # fmt: skip
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def client(stack: StackInfo) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)


def child_runs(stack: StackInfo, experiment: str) -> list[Any]:
    mlflow = client(stack)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = mlflow.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.fixture(scope="module")
def finished_sweep(local_stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path, config = sweep_config(tmp_path_factory.mktemp("sweep"), local_stack)
    result = submit(local_stack, path)
    return {"path": path, "config": config, "result": result, "output": result.stdout + result.stderr}


def test_sweep_job_succeeds_and_prints_a_summary(finished_sweep: dict[str, Any]) -> None:
    out = finished_sweep["output"]
    assert finished_sweep["result"].returncode == 0, out[-4000:]
    assert "succeeded" in out
    for task in ("sentiment", "triage"):
        assert out.count(f"[{task}] step     1 ") == 1  # per-adapter progress in the job log, once (not re-logged
        # by Ray Train's print patch: cluster/runtime_env.yaml)
        assert f"registered {finished_sweep['config']['mlflow']['registry_prefix']}{task} version 1" in out
    assert "delta" in out  # the summary table's header


def test_adapters_trained_concurrently(finished_sweep: dict[str, Any], local_stack: StackInfo) -> None:
    runs = child_runs(local_stack, finished_sweep["config"]["mlflow"]["experiment"])
    assert len(runs) == 2
    latest_start = max(r.info.start_time for r in runs)
    earliest_end = min(r.info.end_time for r in runs)
    assert latest_start < earliest_end  # the two adapters' wall-clock intervals overlap


def test_mlflow_holds_params_tags_metrics_and_artifacts(finished_sweep: dict[str, Any], local_stack: StackInfo) -> None:
    mlflow = client(local_stack)
    config = finished_sweep["config"]
    for run in child_runs(local_stack, config["mlflow"]["experiment"]):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["base_model"] == "tiny-llama" and tags["task"] in config["tasks"]
        assert len(tags["dataset_hash"]) == 16 and len(tags["git_commit"]) >= 7
        assert params["training.learning_rate"] == "0.001" and params["lora.r"] == "4"
        assert params["training.max_steps"] == "6" and params["lora.target_modules"] == "all-linear"
        assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
        assert {"lr", "tokens_per_s"} <= set(metrics)
        assert metrics["final_steps"] == 6
        assert metrics["final_delta"] == pytest.approx(metrics["final_adapter_score"] - metrics["final_base_score"])
        for plain in ("adapter_score", "base_score", "delta", "train_loss", "train_seconds", "epochs"):  # for charts
            assert metrics[plain] == metrics[f"final_{plain}"]
        assert metrics["train_tokens_per_s"] == metrics["final_tokens_per_s"]
        assert {"model/MLmodel", "model/artifacts"} <= {a.path for a in mlflow.list_artifacts(run.info.run_id, "model")}
        files = {a.path for a in mlflow.list_artifacts(run.info.run_id, "adapter")}
        assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= files
        examples = json.loads(Path(mlflow.download_artifacts(run.info.run_id, "eval_examples.json")).read_text())
        assert examples and {"input", "expected"} <= set(examples[0])
    parent = mlflow.get_run(child_runs(local_stack, config["mlflow"]["experiment"])[0].data.tags["mlflow.parentRunId"])
    assert {a.path for a in mlflow.list_artifacts(parent.info.run_id)} >= {"leaderboard.png", "summary.json",
                                                                          "summary_table.json"}  # fmt: skip
    assert parent.data.metrics["adapters"] == 2
    experiment = mlflow.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs


def test_registry_has_a_version_per_adapter_and_a_champion(
    finished_sweep: dict[str, Any], local_stack: StackInfo
) -> None:
    mlflow = client(local_stack)
    prefix = finished_sweep["config"]["mlflow"]["registry_prefix"]
    for task in finished_sweep["config"]["tasks"]:
        (version,) = mlflow.search_model_versions(f"name='{prefix}{task}'")
        assert version.tags["task"] == task and version.tags["base_model"] == "tiny-llama"
        assert version.source.endswith(
            "/model"
        )  # a pyfunc model folder holding the adapter (adapters/mlflow_pyfunc.py)
        # how it was trained travels with the version: data fingerprint, format, metric, prompt, epochs seen
        assert len(version.tags["data_fingerprint"]) == 16
        assert version.tags["data_format"] == {"sentiment": "input_output", "triage": "prompt_completion"}[task]
        assert version.tags["metric"] == {"sentiment": "exact_match", "triage": "choice"}[task]
        assert float(version.tags["epochs"]) == pytest.approx(6 * 4 / {"sentiment": 600, "triage": 30}[task])
        assert version.tags["prompt_mode"] == {"sentiment": "chat", "triage": "completion"}[task]
        assert mlflow.get_model_version_by_alias(f"{prefix}{task}", "champion").version == version.version


def test_resubmitting_the_sweep_skips_finished_adapters(finished_sweep: dict[str, Any], local_stack: StackInfo) -> None:
    assert finished_sweep["result"].returncode == 0
    again = submit(local_stack, finished_sweep["path"])
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert out.count("already trained and registered") == 2
    assert len(child_runs(local_stack, finished_sweep["config"]["mlflow"]["experiment"])) == 2
    prefix = finished_sweep["config"]["mlflow"]["registry_prefix"]
    assert len(client(local_stack).search_model_versions(f"name='{prefix}sentiment'")) == 1


def _train_worker_pids(stack: StackInfo) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=stack.dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if a.class_name == "RayTrainWorker" and a.pid]


def test_killed_worker_resumes_from_its_checkpoint_in_the_same_run(local_stack: StackInfo, tmp_path: Path) -> None:
    path, config = sweep_config(tmp_path, local_stack, tasks=["sentiment"], max_failures=2,
                                **{"training.max_steps": 24, "training.checkpoint_every": 4})  # fmt: skip
    submitted = submit(local_stack, path, "--no-wait", timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    mlflow, experiment = client(local_stack), config["mlflow"]["experiment"]

    deadline = time.monotonic() + 300
    killed_at = None
    while time.monotonic() < deadline and killed_at is None:
        runs = child_runs(local_stack, experiment)
        steps = [m.step for m in mlflow.get_metric_history(runs[0].info.run_id, "loss")] if runs else []
        if steps and max(steps) >= 10:  # past two checkpoints (steps 4 and 8)
            pids = _train_worker_pids(local_stack)
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            killed_at = max(steps)
        time.sleep(0.5)
    assert killed_at is not None, "training never reached step 10"

    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        runs = child_runs(local_stack, experiment)
        if runs and runs[0].data.tags.get("lorafleet.done") == "true":
            break
        time.sleep(2)
    runs = child_runs(local_stack, experiment)
    assert len(runs) == 1  # the retry reused the adapter's run
    run = runs[0]
    assert run.data.tags.get("lorafleet.done") == "true"
    (resumed,) = mlflow.get_metric_history(run.info.run_id, "resumed_from_step")
    # from a checkpoint, not from zero; MLflow may show fewer steps than the worker had reached when it was killed
    # (metrics are sent from a queue), so `killed_at` is a lower bound of the step the worker died at
    assert 4 <= resumed.value < 24 and resumed.value % 4 == 0
    assert run.data.metrics["final_steps"] == 24
    steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")]
    assert steps.count(1) == 1  # step 1 never ran again
    assert sorted(set(steps)) == list(range(1, 25))


BAD_INPUTS = {
    "unknown task": ({"tasks": ["sentiment", "no_such_task"]}, "no_such_task"),
    "missing dataset file": ({"tasks": {"mine": {"train": "/nonexistent/train.jsonl",
                                                  "eval": "/nonexistent/eval.jsonl"}}}, "/nonexistent/train.jsonl"),
    "base model not found": ({"base_model": "/nonexistent/model-folder"}, "/nonexistent/model-folder"),
    "impossible resources": ({"resources": {"workers_per_adapter": 1, "cpus_per_worker": 64}}, "64"),
}  # fmt: skip


@pytest.mark.parametrize("case", [*BAD_INPUTS, "row without output"])
def test_bad_input_stops_before_training_with_one_line(case: str, local_stack: StackInfo, tmp_path: Path) -> None:
    if case == "row without output":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"input": "great film", "output": "positive"}\n{"input": "no answer here"}\n')
        overrides, needle = (
            {"tasks": {"mine": {"train": str(bad), "eval": str(bad), "format": "input_output"}}},
            "output",
        )
    else:
        overrides, needle = BAD_INPUTS[case]
    path, config = sweep_config(tmp_path, local_stack, **overrides)
    result = submit(local_stack, path, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    errors = {line for line in out.splitlines() if line.startswith("error: ")}  # the CLI repeats a failed job's log
    assert len(errors) == 1 and needle in next(iter(errors)), out[-3000:]
    assert "Traceback" not in out
    assert child_runs(local_stack, config["mlflow"]["experiment"]) == []
    registered = client(local_stack).search_registered_models(f"name LIKE '{config['mlflow']['registry_prefix']}%'")
    assert registered == []


def test_killed_driver_then_resubmitted_sweep_retrains_nothing_finished(local_stack: StackInfo, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    path, config = sweep_config(tmp_path, local_stack, max_concurrent_trials=1, **{"training.max_steps": 12})
    submitted = submit(local_stack, path, "--no-wait", timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = next(w for w in submitted.stdout.split() if w.strip("'").startswith("raysubmit_")).strip("'")
    jobs = JobSubmissionClient(local_stack.dashboard_url)
    experiment = config["mlflow"]["experiment"]

    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:  # stop the driver once the first adapter is done and the second has begun
        runs = child_runs(local_stack, experiment)
        if len(runs) == 2 and any(r.data.tags.get("lorafleet.done") == "true" for r in runs):
            break
        time.sleep(1)
    pid = jobs.get_job_info(job_id).driver_info.pid
    os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 120
    while jobs.get_job_status(job_id) not in (JobStatus.FAILED, JobStatus.STOPPED) and time.monotonic() < deadline:
        time.sleep(1)
    runs = child_runs(local_stack, experiment)
    finished = [r.data.tags["lorafleet.adapter"] for r in runs if r.data.tags.get("lorafleet.done") == "true"]
    assert len(finished) == 1, "the driver was killed too late to leave work undone"

    again = submit(local_stack, path)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert f"[{finished[0]}] already trained and registered" in out
    runs = child_runs(local_stack, experiment)
    assert len(runs) == 2 and all(r.data.tags.get("lorafleet.done") == "true" for r in runs)
    prefix = config["mlflow"]["registry_prefix"]
    for task in config["tasks"]:
        assert len(client(local_stack).search_model_versions(f"name='{prefix}{task}'")) == 1
