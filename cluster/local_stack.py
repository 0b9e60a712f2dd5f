"""The local stack in one command: a real Ray head (dashboard on, so `ray job submit` works) and a real MLflow
tracking server (sqlite + local artifacts), both on 127.0.0.1, with all state under one folder (`.lorafleet/`).

    lorafleet up      # or: python -m cluster.cli up   (idempotent: a second `up` reports what is running)
    lorafleet status
    lorafleet down    # stops everything by recorded PID

From Python: `up(StackConfig(...)) -> StackInfo`, `down(config)`, `status(config)`, `read_stack(state_dir)`.
`<state_dir>/stack.json` records ports, PIDs and URLs for other tools (tests, `lorafleet demo`, ...).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cluster import mlflow_server, ray_head, worker_node
from cluster.processes import (
    LOOPBACK,
    ProcessRecord,
    StopOutcome,
    find_process,
    last_log_line,
    port_is_free,
    port_owner,
    stop_tree,
    tree_memory_mb,
    wait_until,
)
from cluster.ray_head import RayPorts
from cluster.stack_state import (
    ComponentStatus,
    DownReport,
    StackConfig,
    StackError,
    StackInfo,
    StackStatus,
    read_stack,
    stack_file,
    write_stack,
)

__all__ = [
    "ComponentStatus",
    "DownReport",
    "StackConfig",
    "StackError",
    "StackInfo",
    "StackStatus",
    "down",
    "read_stack",
    "requested_but_different",
    "stack_file",
    "status",
    "up",
]

RAY, MLFLOW = "ray", "mlflow"


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise `up`/`down` on one state dir (two terminals, or a test and a user)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- health --------------------------------------------------------------------------------------------------


def _ray_healthy(info: StackInfo) -> bool:
    return find_process(info.ray) is not None and ray_head.head_ready(info.ray_ports)


def _mlflow_healthy(info: StackInfo) -> bool:
    return find_process(info.mlflow) is not None and mlflow_server.server_ready(info.mlflow_port)


def _keep(record: ProcessRecord, ready: Callable[[], bool], timeout: float) -> bool:
    """A recorded component is kept if it is alive and answers (waiting for it if it is still starting up)."""
    if find_process(record) is None:
        return False
    return wait_until(ready, timeout=timeout, still_starting=lambda: find_process(record) is not None)


def _stop_all(records: dict[str, ProcessRecord], graceful_timeout: float) -> dict[str, StopOutcome]:
    """Stop several process trees by PID, in parallel (Ray's head drains for a few seconds; MLflow needs ~2 s)."""
    if not records:
        return {}
    with ThreadPoolExecutor(max_workers=len(records)) as pool:
        futures = {
            name: pool.submit(stop_tree, rec, graceful_timeout=graceful_timeout) for name, rec in records.items()
        }
        return {name: future.result() for name, future in futures.items()}


# --- up ------------------------------------------------------------------------------------------------------


def _check_port(port: int, what: str, flag: str) -> None:
    if not port_is_free(port):
        owner = port_owner(port)
        by = f" by {owner}" if owner else ""
        raise StackError(f"port {port} ({what}) is already in use{by}; pick another with {flag}")


def _new_ray(config: StackConfig, state: Path, mlflow_port: int) -> tuple[ProcessRecord, RayPorts, Path]:
    _check_port(config.ray_gcs_port, "Ray GCS", "--ray-port")
    _check_port(config.dashboard_port, "Ray dashboard", "--dashboard-port")
    try:
        ports = ray_head.allocate_ports(
            config.ray_gcs_port,
            config.dashboard_port,
            config.worker_port_count,
            avoid=(config.mlflow_port, config.serve_http_port),
        )
    except RuntimeError as exc:
        raise StackError(str(exc)) from exc
    temp_dir = ray_head.ray_temp_dir(state)
    record = ray_head.start_head(
        ports,
        num_cpus=config.num_cpus,
        num_gpus=config.num_gpus,
        temp_dir=temp_dir,
        log_path=state / "ray" / "head.log",
        mlflow_url=mlflow_server.mlflow_url(mlflow_port),
    )
    return record, ports, temp_dir


def _wait_ready(info: StackInfo, started: list[str], timeout: float) -> None:
    """Wait until every component started by this call answers; raise StackError naming the log otherwise."""
    checks = {
        RAY: (info.ray, lambda: ray_head.head_ready(info.ray_ports)),
        MLFLOW: (info.mlflow, lambda: mlflow_server.server_ready(info.mlflow_port)),
    }
    pending = {name: checks[name] for name in started}
    deadline = time.monotonic() + timeout
    while pending:
        for name, (record, ready) in list(pending.items()):
            if ready():
                del pending[name]
            elif find_process(record) is None:
                why = last_log_line(record.log_path)
                raise StackError(f"{name} exited during start-up{': ' + why if why else ''}", record.log_path)
        if pending and time.monotonic() > deadline:
            name, (record, _) = next(iter(pending.items()))
            raise StackError(f"{name} did not answer within {timeout:.0f}s", record.log_path)
        if pending:
            time.sleep(0.25)


def up(config: StackConfig | None = None) -> StackInfo:
    """Start (or find) the local stack; returns it once Ray's dashboard and MLflow both answer.

    Idempotent per component: a recorded process that is alive and answering is kept; a dead one is cleaned up
    (its leftovers stopped by PID) and started again. A requested port held by anything else is a StackError."""
    config = config or StackConfig()
    state = config.resolved_state_dir()
    with _locked(state):
        previous = read_stack(state)
        keep_ray = keep_mlflow = False
        if previous is not None:
            keep_ray = _keep(previous.ray, lambda: _ray_healthy(previous), config.startup_timeout_s)
            keep_mlflow = _keep(previous.mlflow, lambda: _mlflow_healthy(previous), config.startup_timeout_s)
        if previous is not None and keep_ray and keep_mlflow:
            return previous.model_copy(update={"started": []})
        if previous is not None:  # stale components: stop whatever is left of them (by PID) before restarting
            recorded = ((RAY, previous.ray, keep_ray), (MLFLOW, previous.mlflow, keep_mlflow))
            _stop_all({name: rec for name, rec, keep in recorded if not keep}, config.stop_timeout_s)
        if not keep_mlflow:
            _check_port(config.mlflow_port, "MLflow", "--mlflow-port")

        started: list[str] = []
        records: list[ProcessRecord] = []
        try:
            if keep_ray and previous is not None:
                ray_record, ports, temp_dir = previous.ray, previous.ray_ports, Path(previous.ray_temp_dir)
                num_cpus = previous.num_cpus
            else:
                mlflow_port = previous.mlflow_port if keep_mlflow and previous is not None else config.mlflow_port
                ray_record, ports, temp_dir = _new_ray(config, state, mlflow_port)
                num_cpus = config.num_cpus
                started.append(RAY)
                records.append(ray_record)
            if keep_mlflow and previous is not None:
                mlflow_record, mlflow_port = previous.mlflow, previous.mlflow_port
            else:
                mlflow_port = config.mlflow_port
                mlflow_record = mlflow_server.start_server(state, mlflow_port, state / "mlflow" / "server.log")
                started.append(MLFLOW)
                records.append(mlflow_record)
            info = StackInfo(
                state_dir=str(state),
                ray_address=f"{LOOPBACK}:{ports.gcs}",
                dashboard_url=ray_head.dashboard_url(ports),
                mlflow_url=mlflow_server.mlflow_url(mlflow_port),
                serve_url=f"http://{LOOPBACK}:{config.serve_http_port}",
                num_cpus=num_cpus,
                ray_ports=ports,
                mlflow_port=mlflow_port,
                serve_http_port=config.serve_http_port,
                ray_temp_dir=str(temp_dir),
                ray=ray_record,
                mlflow=mlflow_record,
                started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                started=started,
            )
            write_stack(info)  # before waiting, so an interrupted `up` can still be cleaned up by `down`
            _wait_ready(info, started, config.startup_timeout_s)
        except BaseException:
            _stop_all(dict(zip(started, records, strict=True)), graceful_timeout=10.0)
            if previous is not None:
                write_stack(previous)
            else:
                stack_file(state).unlink(missing_ok=True)
            raise
        return info


def requested_but_different(config: StackConfig, info: StackInfo) -> list[str]:
    """Settings in `config` that the already-running `info` does not match (they apply after `down` + `up`)."""
    pairs = {
        "ray port": (config.ray_gcs_port, info.ray_ports.gcs),
        "dashboard port": (config.dashboard_port, info.ray_ports.dashboard),
        "mlflow port": (config.mlflow_port, info.mlflow_port),
        "serve port": (config.serve_http_port, info.serve_http_port),
        "num cpus": (config.num_cpus, info.num_cpus),
    }
    return [f"{name}: requested {want}, running {have}" for name, (want, have) in pairs.items() if want != have]


# --- down / status -------------------------------------------------------------------------------------------


def down(config: StackConfig | None = None) -> DownReport:
    """Stop the recorded stack by PID (process trees, SIGKILL after a timeout) and remove its record.
    Harmless when nothing runs."""
    config = config or StackConfig()
    state = config.resolved_state_dir()
    if not stack_file(state).exists():
        return DownReport(had_record=False)
    with _locked(state):
        info = read_stack(state)
        if info is None:
            return DownReport(had_record=False)
        nodes = worker_node.stop_all(state, config.stop_timeout_s)  # `lorafleet add-node` raylets, before the head
        stopped = _stop_all({RAY: info.ray, MLFLOW: info.mlflow}, config.stop_timeout_s)
        report = DownReport(had_record=True, stopped={**{f"node {n}": o for n, o in nodes.items()}, **stopped})
        if not report.leftover_pids:
            stack_file(state).unlink(missing_ok=True)
        return report


def status(config: StackConfig | None = None, *, with_memory: bool = True) -> StackStatus:
    """What `stack.json` records and whether each component is alive and answering."""
    config = config or StackConfig()
    info = read_stack(config.resolved_state_dir())
    if info is None:
        return StackStatus(info=None)
    components = []
    for name, record, url, healthy in (
        (RAY, info.ray, info.dashboard_url, _ray_healthy),
        (MLFLOW, info.mlflow, info.mlflow_url, _mlflow_healthy),
    ):
        alive = find_process(record) is not None
        components.append(
            ComponentStatus(
                name=name,
                pid=record.pid,
                alive=alive,
                healthy=alive and healthy(info),
                url=url,
                memory_mb=tree_memory_mb(record) if (alive and with_memory) else None,
                log_path=record.log_path,
            )
        )
    return StackStatus(info=info, components=components)
