"""The local stack's MLflow tracking server: `mlflow server` on 127.0.0.1 with a sqlite backend and a local
artifact store under `<state_dir>/mlflow/`, one worker, run as a child in its own session (stopped by PID).

Used by `cluster/local_stack.py`; run the stack with `lorafleet up` / `python -m cluster.cli up`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.processes import LOOPBACK, ProcessRecord, http_ok, spawn_in_new_session
from cluster.ray_head import venv_bin


def mlflow_dir(state_dir: Path) -> Path:
    return state_dir / "mlflow"


def mlflow_url(port: int) -> str:
    return f"http://{LOOPBACK}:{port}"


def mlflow_executable() -> str:
    candidate = venv_bin() / "mlflow"
    return str(candidate) if candidate.exists() else "mlflow"


def server_command(state_dir: Path, port: int) -> list[str]:
    root = mlflow_dir(state_dir).resolve()
    return [
        mlflow_executable(),
        "server",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes (~0.5 GB instead of ~2 GB)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"  # no outbound lookup
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start_server(state_dir: Path, port: int, log_path: Path) -> ProcessRecord:
    root = mlflow_dir(state_dir)
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    return spawn_in_new_session(server_command(state_dir, port), env=server_env(), log_path=log_path, cwd=root)


def server_ready(port: int) -> bool:
    return http_ok(f"{mlflow_url(port)}/health")
