"""MLflow restarted mid-sweep loses nothing: a real `ray job submit` sweep of two tiny-llama adapters (one short,
one long) logs to its own `mlflow server`; once the short adapter's last step is in MLflow, the server's process
tree is killed with SIGKILL (by PID), left down for DOWN_S seconds and started again on the same port, sqlite
backend and artifact folder. The job must succeed, and MLflow must hold every adapter's run exactly once, FINISHED,
with all its params, a `loss` point for every step (those measured during the outage too), its adapter files and
one registry version. The short adapter's finish (final metrics, artifacts, registration) falls inside the outage;
the long one trains through it. MLflow's own client retries are cut to one in the job
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES=1`), so what is checked is lorafleet's retrying (jobs/tracking.py, RayHooks),
not urllib3's ~4-minute backoff.

    pytest tests/test_fault_mlflow_restart.py -s        # about 3 minutes on 2 cores; -s shows the outage figures

The quick tests at the top (not `slow`) check the same machinery without servers: bounded retry, the metric queue,
and that re-sent creates cannot leave duplicate runs or model versions.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from test_sweep_cluster import sweep_config

from cluster import mlflow_server
from cluster.processes import ProcessRecord, find_process, stop_tree, tree_members, wait_until
from cluster.stack_state import StackInfo
from jobs.config import SweepConfig, TrialSpec, load_config
from jobs.mlflow_retry import TrackingUnavailable, call_with_retry
from jobs.tracking import TAG_ADAPTER, TAG_DONE, TAG_VERSION, SweepTracker, flatten

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
DOWN_S = 20.0  # how long the server stays dead before it is started again
SHORT, LONG = 8, 150  # steps of the two adapters: the long one must still be training when the server comes back


# --- quick: the retry machinery, no servers --------------------------------------------------------------------


def _flaky(failures: int, error: Exception) -> tuple[Callable[[], str], list[float]]:
    calls: list[float] = []

    def call() -> str:
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise error
        return "ok"

    return call, calls


def test_call_with_retry_rides_out_an_outage_then_gives_up_with_a_message() -> None:
    from mlflow.exceptions import MlflowException

    refused = requests.ConnectionError("[Errno 111] Connection refused")
    call, calls = _flaky(2, refused)
    assert call_with_retry("log_batch", call, retry_s=30) == "ok" and len(calls) == 3  # backoff 1 s, 2 s

    call, calls = _flaky(1000, refused)
    with pytest.raises(TrackingUnavailable, match=r"did not answer for 2 s .* during create_run; giving up"):
        call_with_retry("create_run", call, retry_s=2)
    assert 2 <= len(calls) <= 3 and calls[-1] - calls[0] < 4

    call, calls = _flaky(1000, MlflowException("no such run", error_code="RESOURCE_DOES_NOT_EXIST"))
    with pytest.raises(MlflowException, match="no such run"):
        call_with_retry("get_run", call, retry_s=30)
    assert len(calls) == 1  # a real error is not retried


def _spec(tmp_path: Path, **training: Any) -> TrialSpec:
    config = SweepConfig.model_validate({"name": "quick", "base_model": "tiny-llama", "tasks": ["sentiment"],
                                         "training": {"max_steps": 5, **training}, "storage_path": str(tmp_path),
                                         "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})  # fmt: skip
    return config.trials()[0]


def test_ray_hooks_queue_metrics_while_mlflow_is_down_and_deliver_them_in_order(tmp_path: Path) -> None:
    from jobs.ray_train import RayHooks

    class FlakyTracker:
        def __init__(self) -> None:
            self.down, self.sent = True, []

        def log_steps(self, run_id: str, batches: list[tuple[int, int, dict[str, float]]]) -> None:
            time.sleep(0.05)
            if self.down:
                raise TrackingUnavailable("MLflow did not answer")
            self.sent += batches

    hooks = RayHooks(_spec(tmp_path), "run", "http://127.0.0.1:9", "exp", rank=0)
    tracker = hooks._tracker = FlakyTracker()  # type: ignore[assignment]
    started = time.monotonic()
    for step in (1, 2, 3, 4):
        hooks.log(step, {"loss": 1.0 / step})
    assert time.monotonic() - started < 1.0  # training does not wait for MLflow
    assert not hooks.close(timeout=0.5) and tracker.sent == []
    up_at: list[float] = []

    def mlflow_back() -> None:
        up_at.append(time.time() * 1000)
        tracker.down = False

    threading.Timer(1.0, mlflow_back).start()
    hooks.log(5, {"loss": 0.2})  # the last step: waits until everything is delivered
    assert [(step, metrics["loss"]) for step, _, metrics in tracker.sent] == [(1, 1.0), (2, 0.5), (3, 1 / 3),
                                                                            (4, 0.25), (5, 0.2)]  # fmt: skip
    stamps = [ts for _, ts, _ in tracker.sent]
    assert stamps == sorted(stamps) and stamps[3] < up_at[0]  # the time each was measured, not sent


def test_re_sent_creates_leave_one_run_and_one_model_version(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("quick", artifact_location=str(tmp_path / "artifacts"))
    tracker, spec = SweepTracker(uri, "quick"), _spec(tmp_path)
    parent = tracker.client.create_run(tracker.experiment_id, run_name="parent").info.run_id
    create = tracker.client.raw.create_run
    tracker.client.raw.create_run = lambda *a, **k: [create(*a, **k) for _ in range(2)][-1]  # a reply lost, re-sent
    run_id, done = tracker.child_run(parent, spec, "hash")
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG_ADAPTER}` = '{spec.adapter_name}'")
    assert not done and [r.info.run_id for r in runs] == [run_id]
    assert tracker.child_run(parent, spec, "hash") == (run_id, False)

    name = spec.registered_model
    tracker.client.create_registered_model(name)
    source = f"{tracker.client.get_run(run_id).info.artifact_uri}/adapter"
    for _ in range(2):  # two versions from one run: a create_model_version re-sent after its reply was lost
        tracker.client.create_model_version(name, source, run_id=run_id, tags={"adapter_score": "1.0"})
    outcome = {"adapter_score": 1.0, "base_score": 0.0}
    assert tracker.register(run_id, spec, outcome, "accuracy") == "1"
    assert [str(v.version) for v in tracker.client.search_model_versions(f"name='{name}'")] == ["1"]
    assert tracker.client.get_run(run_id).data.tags[TAG_VERSION] == "1"

    # Trials of one task finishing together race on the champion alias: the server's select-then-insert fails
    # one writer with a unique-constraint error, and a writer that read the versions early can set a stale one.
    best = {score: tracker.client.create_model_version(name, source, run_id=run_id, tags={"adapter_score": score})
            for score in ("0.5", "2.0", "1.5")}["2.0"].version  # fmt: skip
    raw = tracker.client.raw
    set_alias, search = raw.set_registered_model_alias, raw.search_model_versions
    lost_race = [MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.alias")]

    def racing_set_alias(*args: Any) -> None:
        if lost_race:
            raise lost_race.pop()
        set_alias(*args)

    raw.set_registered_model_alias = racing_set_alias
    assert tracker.update_champion(name) == str(best) and not lost_race
    read_early = [True]

    def early_then_fresh(query: str) -> list[Any]:
        versions = search(query)
        return [v for v in versions if v.version != best] if read_early and read_early.pop() else versions

    raw.search_model_versions = early_then_fresh
    assert tracker.update_champion(name) == str(best) and not read_early
    assert tracker.client.get_model_version_by_alias(name, "champion").version == best


# --- slow: a real sweep through a real server restart ---------------------------------------------------------


class Server:
    """Our MLflow server (its record changes when it is started again)."""

    def __init__(self, state: Path, port: int) -> None:
        self.state, self.port, self.url = state, port, mlflow_server.mlflow_url(port)
        self.record: ProcessRecord | None = None

    def start(self, timeout: float = 120) -> float:
        """Start it and wait until it answers; returns the time.time() it did."""
        record = self.record = mlflow_server.start_server(self.state, self.port, self.state / "server.log")
        ok = wait_until(lambda: mlflow_server.server_ready(self.port), timeout=timeout,
                        still_starting=lambda: find_process(record) is not None)  # fmt: skip
        assert ok, (self.state / "server.log").read_text()[-3000:]
        return time.time()

    def crash(self) -> float:
        """SIGKILL every process of the server's tree, by PID (the leader and uvicorn under it)."""
        assert self.record is not None
        members = tree_members(self.record)
        assert members, "the MLflow server is not running"
        for proc in members:
            os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        record = self.record  # tree_members reaps what was our child, so no zombie stays behind
        assert wait_until(lambda: not tree_members(record), timeout=10, still_starting=lambda: True)
        assert not mlflow_server.server_ready(self.port)
        return killed_at


@pytest.fixture
def server(tmp_path: Path, port_picker: Callable[[int], list[int]]) -> Iterator[Server]:
    server = Server(tmp_path / "mlflow-state", port_picker(1)[0])
    server.start()
    try:
        yield server
    finally:
        if server.record is not None:
            assert not stop_tree(server.record, graceful_timeout=10).leftover_pids


def _submit(stack: StackInfo, config: Path, runtime_env: Path, job_id: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [RAY, "job", "submit", "--address", stack.dashboard_url, "--runtime-env", str(runtime_env),
               "--submission-id", job_id, "--no-wait", "--", "python", "-m", "jobs.sweep", "--config", str(config)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def _child_runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100) if exp else []
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(interval)
    return result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_restarted_mid_sweep_loses_no_run_param_metric_or_artifact(
    local_stack: StackInfo, server: Server, tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient
    from safetensors.torch import load_file

    path, config = sweep_config(tmp_path, local_stack, tasks=["sentiment"], grid={"training.max_steps": [SHORT, LONG]},
                                **{"mlflow.tracking_uri": server.url, "training.checkpoint_every": 1000})  # fmt: skip
    runtime_env = yaml.safe_load((REPO_ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    specs = {s.adapter_name: s for s in load_config(path).trials()}
    short = next(name for name, s in specs.items() if s.training.max_steps == SHORT)
    job_id = f"mlflow-restart-{uuid.uuid4().hex[:8]}"
    _submit(local_stack, path, tmp_path / "runtime_env.yaml", job_id)
    jobs, mlflow = JobSubmissionClient(local_stack.dashboard_url), MlflowClient(server.url, server.url)

    def loss_steps(run_id: str) -> list[int]:
        return [m.step for m in mlflow.get_metric_history(run_id, "loss")]

    def short_trained() -> bool:
        assert jobs.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING), jobs.get_job_logs(job_id)
        runs = {r.data.tags[TAG_ADAPTER]: r for r in _child_runs(mlflow, config["mlflow"]["experiment"])}
        return len(runs) == 2 and max(loss_steps(runs[short].info.run_id), default=0) == SHORT

    _wait(f"{short} to log its last step", short_trained, timeout=300)
    killed_at = server.crash()
    time.sleep(max(0.0, killed_at + DOWN_S - time.time()))  # the outage itself
    back_at = server.start()
    print(f"\nMLflow down from kill to answering again: {back_at - killed_at:.1f} s", flush=True)

    _wait("the sweep job to end", lambda: jobs.get_job_status(job_id).is_terminal(), timeout=400, interval=2)
    logs = jobs.get_job_logs(job_id)
    (tmp_path / "job.log").write_text(logs)
    assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-5000:]
    # the short adapter's finish (its Tune trial: final metrics, artifacts, registration) met the outage, retried
    assert re.search(r"\(run_trial pid=\d+\)\S*\s+MLflow \S+ unreachable during", logs), tmp_path / "job.log"
    assert "answers again" in logs
    assert "did not take" not in logs and "giving up" not in logs and "refused the metrics" not in logs

    runs = _child_runs(mlflow, config["mlflow"]["experiment"])
    assert sorted(r.data.tags[TAG_ADAPTER] for r in runs) == sorted(specs)  # each adapter's run exactly once
    versions = mlflow.search_model_versions(f"name='{config['mlflow']['registry_prefix']}sentiment'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)  # one version per run
    during_outage = 0
    for run in runs:
        spec, run_id = specs[run.data.tags[TAG_ADAPTER]], run.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags[TAG_DONE] == "true"
        assert run.data.params == flatten("", spec.model_dump(mode="json", exclude={"point", "sweep"}), {})
        steps = spec.training.max_steps
        assert loss_steps(run_id) == list(range(1, steps + 1))  # every step once: none lost, none doubled
        assert [m.step for m in mlflow.get_metric_history(run_id, "lr")] == list(range(1, steps + 1))
        assert run.data.metrics["final_steps"] == steps and "final_adapter_score" in run.data.metrics
        history = mlflow.get_metric_history(run_id, "loss")
        during_outage += sum(killed_at * 1000 <= m.timestamp <= back_at * 1000 for m in history)
        files = {a.path for a in mlflow.list_artifacts(run_id, "adapter")}
        assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= files
        assert load_file(mlflow.download_artifacts(run_id, "adapter/adapter_model.safetensors", str(tmp_path)))
        (version,) = [v for v in versions if v.run_id == run_id]
        assert run.data.tags[TAG_VERSION] == version.version and version.source.endswith("/model")
    assert during_outage >= 5, "the long adapter was not training while MLflow was down"
    print(f"loss points measured while MLflow was down and delivered after: {during_outage}", flush=True)
    parent = mlflow.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in mlflow.list_artifacts(parent.info.run_id)} >= {"summary.json", "leaderboard.png"}
