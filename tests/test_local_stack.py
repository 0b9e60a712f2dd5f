"""Tests for the local stack (`cluster/local_stack.py`, `lorafleet up` / `status` / `down`) against real processes:
a real Ray head and MLflow server on free loopback ports, checked over HTTP, stopped by PID. No mocks.

Run: `pytest tests/test_local_stack.py` (about 1.5-2 minutes on 2 cores; all but the process-tree test are `slow`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import httpx
import psutil
import pytest
from stack_processes import stack_processes, still_running

from cluster.local_stack import StackConfig, StackError, StackInfo, down, read_stack, status, up
from cluster.processes import port_is_listening, spawn_in_new_session, stop_tree, tree_members

pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_IPS = {"127.0.0.1", "::ffff:127.0.0.1"}


def _client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=30)


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def _port_args(config: StackConfig) -> list[str]:
    return [
        f"--state-dir={config.state_dir}",
        f"--ray-port={config.ray_gcs_port}",
        f"--dashboard-port={config.dashboard_port}",
        f"--mlflow-port={config.mlflow_port}",
        f"--serve-port={config.serve_http_port}",
        f"--num-cpus={config.num_cpus}",
    ]


@pytest.mark.slow
def test_stack_answers_over_http(local_stack: StackInfo) -> None:
    with _client() as client:
        ver = client.get(f"{local_stack.dashboard_url}/api/version")
        assert ver.status_code == 200 and ver.json()["ray_version"] == version("ray")
        assert client.get(f"{local_stack.dashboard_url}/api/jobs/").status_code == 200
        assert client.get(f"{local_stack.mlflow_url}/health").text.strip() == "OK"

        name = f"local-stack-{uuid.uuid4().hex[:8]}"
        created = client.post(f"{local_stack.mlflow_url}/api/2.0/mlflow/experiments/create", json={"name": name})
        assert created.status_code == 200, created.text
        exp_id = created.json()["experiment_id"]
        got = client.get(f"{local_stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": exp_id})
        assert got.json()["experiment"]["name"] == name
    assert (Path(local_stack.state_dir) / "mlflow" / "mlflow.db").exists()

    recorded = read_stack(local_stack.state_dir)
    assert recorded is not None and recorded.model_dump() == local_stack.model_dump()
    assert local_stack.ray_address == f"127.0.0.1:{local_stack.ray_ports.gcs}"


@pytest.mark.slow
def test_everything_listens_on_loopback_only(local_stack: StackInfo) -> None:
    pids = set(stack_processes(local_stack))
    listening = [
        c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr
    ]
    ports = {c.laddr.port for c in listening}
    assert {local_stack.ray_ports.dashboard, local_stack.ray_ports.gcs, local_stack.mlflow_port} <= ports
    assert {(c.laddr.ip, c.laddr.port) for c in listening if c.laddr.ip not in LOOPBACK_IPS} == set()


@pytest.mark.slow
def test_second_up_reports_the_running_stack(local_stack: StackInfo, local_stack_config: StackConfig) -> None:
    again = up(local_stack_config)
    assert again.already_running
    assert (again.ray.pid, again.mlflow.pid) == (local_stack.ray.pid, local_stack.mlflow.pid)

    result = _cli("up", *_port_args(local_stack_config))
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stdout
    assert f"ray job submit --address {local_stack.dashboard_url}" in result.stdout
    assert str(local_stack.ray.pid) in result.stdout and local_stack.mlflow_url in result.stdout

    st = _cli("status", f"--state-dir={local_stack_config.state_dir}")
    assert st.returncode == 0, st.stdout + st.stderr
    assert st.stdout.count("running") >= 2
    assert status(local_stack_config, with_memory=False).running


@pytest.mark.slow
def test_ray_job_submit_runs_on_the_stack(local_stack: StackInfo) -> None:
    entrypoint = "import ray, sys; ray.init(); print('PREFIX', sys.prefix); print(ray.cluster_resources())"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", local_stack.dashboard_url]
        + ["--", "python", "-c", entrypoint],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "'CPU': 4.0" in out
    assert f"PREFIX {sys.prefix}" in out  # the driver ran the venv's python (venv bin first on the head's PATH)


@pytest.mark.slow
def test_local_driver_connects_with_ray_address(local_stack: StackInfo) -> None:
    code = f"import ray; ray.init(address={local_stack.ray_address!r}); print(ray.cluster_resources()['CPU'])"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, **local_stack.client_env()},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "4.0"


@pytest.mark.slow
def test_up_restart_down_lifecycle(tmp_path: Path, port_picker: Callable[[int], list[int]]) -> None:
    gcs, dashboard, mlflow, serve = port_picker(4)
    config = StackConfig(
        state_dir=tmp_path / "stack",
        ray_gcs_port=gcs,
        dashboard_port=dashboard,
        mlflow_port=mlflow,
        serve_http_port=serve,
        num_cpus=2,
        startup_timeout_s=240,
    )
    info = up(config)
    try:
        assert sorted(info.started) == ["mlflow", "ray"]
        # A dead component is cleaned up (its orphaned server process stopped by PID) and started again;
        # the live Ray head is kept.
        old_mlflow = stack_processes(info)
        os.kill(info.mlflow.pid, signal.SIGKILL)
        again = up(config)
        assert again.started == ["mlflow"] and again.ray.pid == info.ray.pid and again.mlflow.pid != info.mlflow.pid
        assert not [pid for pid in still_running(old_mlflow) if pid not in stack_processes(again)]

        procs = stack_processes(again)
        assert len(procs) > 5
        report = down(config)
    finally:
        down(config)
        if not Path(info.ray_temp_dir).is_relative_to(tmp_path):  # the short /tmp path used for Ray's sockets
            shutil.rmtree(info.ray_temp_dir, ignore_errors=True)
    assert report.was_running and report.leftover_pids == []
    assert still_running(procs) == []
    assert not any(port_is_listening(p) for p in (gcs, dashboard, mlflow))
    assert read_stack(config.state_dir) is None

    second = down(config)
    assert not second.had_record and not second.was_running
    result = _cli("down", f"--state-dir={config.state_dir}")
    assert result.returncode == 0 and "Nothing running" in result.stdout


@pytest.mark.slow
def test_taken_port_is_a_one_line_error(tmp_path: Path, port_picker: Callable[[int], list[int]]) -> None:
    gcs, dashboard, mlflow = port_picker(3)
    config = StackConfig(state_dir=tmp_path / "s", ray_gcs_port=gcs, dashboard_port=dashboard, mlflow_port=mlflow)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", dashboard))
        squatter.listen()
        with pytest.raises(StackError, match=f"port {dashboard} \\(Ray dashboard\\) is already in use"):
            up(config)
        result = _cli("up", *_port_args(config))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and f"port {dashboard}" in result.stderr
    assert read_stack(config.state_dir) is None
    assert not any(port_is_listening(p) for p in (gcs, mlflow))


_STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "code = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)'\n"
    "subprocess.Popen([sys.executable, '-c', code])\n"
    "time.sleep(120)\n"
)


def test_stop_tree_escalates_to_sigkill_and_finds_orphans(tmp_path: Path) -> None:
    """A tree that ignores SIGTERM is SIGKILLed; a child orphaned by its dead leader is still found (by session)."""
    for kill_leader_first in (False, True):
        record = spawn_in_new_session([sys.executable, "-c", _STUBBORN], env=os.environ, log_path=tmp_path / "log")
        deadline = time.monotonic() + 30
        while len(tree_members(record)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        members = {p.pid: p.create_time() for p in tree_members(record)}
        assert len(members) == 2
        if kill_leader_first:
            os.kill(record.pid, signal.SIGKILL)
            os.waitpid(record.pid, 0)
            del members[record.pid]
        outcome = stop_tree(record, graceful_timeout=0.5, term_timeout=0.5)
        assert outcome.was_running and set(outcome.killed_pids) == set(members) and outcome.leftover_pids == []
        assert still_running(members) == []
        assert not stop_tree(record).was_running
