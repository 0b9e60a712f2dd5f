"""What lorafleet's local stack is, as data: `StackConfig` (what `up` should start), `StackInfo` (what runs; the
schema of `<state_dir>/stack.json`, read with `read_stack`), the status/down reports, and `StackError`.

No processes are touched here; `cluster/local_stack.py` starts and stops them (`lorafleet up` / `down`).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.processes import ProcessRecord, StopOutcome
from cluster.ray_head import RayPorts

STACK_FILE = "stack.json"


class StackError(RuntimeError):
    """A one-line, user-facing failure; `log_path` points at the log to read next (if any)."""

    def __init__(self, message: str, log_path: Path | str | None = None) -> None:
        super().__init__(message)
        self.log_path = Path(log_path) if log_path else None


class StackConfig(BaseModel):
    """What `up` should start. Only `state_dir` matters to `down` and `status` (they read `stack.json`)."""

    model_config = ConfigDict(extra="forbid")

    state_dir: Path = Path(".lorafleet")
    ray_gcs_port: int = Field(6379, ge=1, le=65535)
    dashboard_port: int = Field(8265, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    serve_http_port: int = Field(8000, ge=1, le=65535, description="recorded for Serve users; not started here")
    num_cpus: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    num_gpus: int | None = Field(None, ge=0, description="None: let Ray detect GPUs")
    worker_port_count: int = Field(200, ge=16, le=2000, description="size of the Ray worker port range")
    startup_timeout_s: float = Field(180.0, gt=0)
    stop_timeout_s: float = Field(30.0, gt=0, description="graceful shutdown time before SIGTERM/SIGKILL escalation")

    @model_validator(mode="after")
    def _distinct_ports(self) -> StackConfig:
        ports = [self.ray_gcs_port, self.dashboard_port, self.mlflow_port, self.serve_http_port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"gcs, dashboard, mlflow and serve ports must differ, got {ports}")
        return self

    def resolved_state_dir(self) -> Path:
        return self.state_dir.expanduser().resolve()


class StackInfo(BaseModel):
    """A running stack, as persisted in `<state_dir>/stack.json`."""

    model_config = ConfigDict(extra="forbid")

    state_dir: str
    ray_address: str  # GCS address for `ray.init(address=...)` on this machine (with `client_env()` set)
    dashboard_url: str  # `ray job submit --address <dashboard_url>`
    mlflow_url: str  # MLFLOW_TRACKING_URI and the MLflow UI
    serve_url: str  # where Ray Serve's HTTP proxy goes once someone starts Serve on this head
    num_cpus: int
    ray_ports: RayPorts
    mlflow_port: int
    serve_http_port: int
    ray_temp_dir: str
    ray: ProcessRecord
    mlflow: ProcessRecord
    started_at: str
    # Not persisted: what this `up` call started (empty when everything was already running).
    started: list[str] = Field(default_factory=list, exclude=True)

    @property
    def already_running(self) -> bool:
        return not self.started

    @property
    def ray_log(self) -> Path:
        return Path(self.ray.log_path)

    @property
    def mlflow_log(self) -> Path:
        return Path(self.mlflow.log_path)

    def client_env(self) -> dict[str, str]:
        """Environment for local clients of this stack. Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 a driver's
        `ray.init(address=ray_address)` resolves 127.0.0.1 to the external interface and fails to connect."""
        return {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        }  # as the head (cluster/ray_head.py)

    def job_submit_command(self, entrypoint: str = "python my_job.py", working_dir: str = ".") -> str:
        return f"ray job submit --address {self.dashboard_url} --working-dir {working_dir} -- {entrypoint}"


class ComponentStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    pid: int
    alive: bool
    healthy: bool
    url: str
    memory_mb: float | None = None  # PSS of the whole process tree
    log_path: str


class StackStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    info: StackInfo | None
    components: list[ComponentStatus] = []

    @property
    def running(self) -> bool:
        return bool(self.components) and all(c.healthy for c in self.components)


class DownReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    had_record: bool  # a stack.json existed
    stopped: dict[str, StopOutcome] = {}

    @property
    def was_running(self) -> bool:
        return any(o.was_running for o in self.stopped.values())

    @property
    def leftover_pids(self) -> list[int]:
        return sorted(pid for o in self.stopped.values() for pid in o.leftover_pids)


# --- stack.json ----------------------------------------------------------------------------------------------


def stack_file(state_dir: Path | str) -> Path:
    return Path(state_dir).expanduser().resolve() / STACK_FILE


def read_stack(state_dir: Path | str) -> StackInfo | None:
    """The stack recorded in `<state_dir>/stack.json` (running or not), or None when there is none."""
    path = stack_file(state_dir)
    try:
        return StackInfo.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValidationError, ValueError) as exc:
        raise StackError(f"{path} is unreadable ({exc.__class__.__name__}); stop its processes and delete it") from exc


def write_stack(info: StackInfo) -> None:
    path = stack_file(info.state_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(info.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)
