"""More Ray nodes for the local stack: a worker raylet on 127.0.0.1, joined to the recorded head, with its own CPUs,
custom resources, temp dir and ports. `lorafleet add-node` starts one; `lorafleet down` stops them before the head.

    lorafleet up
    lorafleet add-node --num-cpus 2 [--resources '{"node_b": 1}'] [--name b]
    lorafleet down

Why a wrapper around `ray start`: the stack keeps Ray on loopback with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (without
it Ray 2.60 replaces `--node-ip-address=127.0.0.1` with the machine's external address), and with that setting the
`ray start` command refuses to join an existing head ("Multi-node Ray clusters are not supported on Windows and
OSX"). That refusal is a check in the CLI process only (ray/scripts/scripts.py); node addresses are resolved in
ray/_private/services.py from the same constant. `python -m cluster.worker_node <ray start args>` runs Ray's own
`ray start` with the refusal lifted for that one check, so the node joins and still registers as 127.0.0.1.

The nodes are recorded in `<state_dir>/workers.json` (`WorkerNode` records); `stop_all` stops them by PID.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from cluster import ray_head
from cluster.processes import (
    LOOPBACK,
    ProcessRecord,
    StopOutcome,
    find_process,
    last_log_line,
    spawn_in_new_session,
    stop_tree,
)
from cluster.ray_head import RayPorts
from cluster.stack_state import StackError, StackInfo

WORKERS_FILE = "workers.json"
# On a busy machine Ray's node start-up can time out (its raylet waits 15 s for the node's agents, `ray start` 30 s
# for the raylet); another try usually gets through.
START_ATTEMPTS = 3
NODE_LABEL = "lorafleet-node"  # Ray node label holding the worker node's name


class WorkerNode(BaseModel):
    """One worker raylet of the local stack, as recorded in `<state_dir>/workers.json`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    node_id: str
    num_cpus: int
    resources: dict[str, float]
    ports: RayPorts
    temp_dir: str
    process: ProcessRecord


class WorkerNodes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodes: list[WorkerNode] = Field(default_factory=list)


class _JoinAllowed(ModuleType):
    """`ray._private.ray_constants` as `ray start` sees it, except that joining an existing head is allowed."""

    ENABLE_RAY_CLUSTER = True

    def __init__(self, wrapped: ModuleType) -> None:
        super().__init__(wrapped.__name__)
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


# --- records -------------------------------------------------------------------------------------------------


def workers_file(state_dir: Path | str) -> Path:
    return Path(state_dir).expanduser().resolve() / WORKERS_FILE


def read_workers(state_dir: Path | str) -> WorkerNodes:
    path = workers_file(state_dir)
    try:
        return WorkerNodes.model_validate_json(path.read_text())
    except FileNotFoundError:
        return WorkerNodes()
    except ValueError as exc:
        raise StackError(f"{path} is unreadable ({exc.__class__.__name__}); stop its processes and delete it") from exc


def _write_workers(state_dir: Path | str, nodes: WorkerNodes) -> None:
    path = workers_file(state_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(nodes.model_dump_json(indent=2) + "\n")
    tmp.replace(path)


def parse_resources(text: str) -> dict[str, float]:
    """`--resources` as given on the command line: a JSON object of custom resource name -> amount."""
    try:
        value = json.loads(text or "{}")
    except ValueError as exc:
        raise StackError(f"resources: not JSON ({exc}); e.g. '{{\"node_b\": 1}}'") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
        for k, v in value.items()
    ):
        raise StackError(f"resources: expected an object of name -> non-negative number, got {text!r}")
    if {"CPU", "GPU", "memory", "object_store_memory"} & set(value):
        raise StackError("resources: CPU, GPU and memory are not custom resources; use --num-cpus")
    return {k: float(v) for k, v in value.items()}


# --- start ---------------------------------------------------------------------------------------------------


def worker_command(head: StackInfo, ports: RayPorts, *, name: str, num_cpus: int, resources: dict[str, float],
                   temp_dir: Path) -> list[str]:  # fmt: skip
    return [
        sys.executable,
        "-m",
        "cluster.worker_node",
        f"--address={LOOPBACK}:{head.ray_ports.gcs}",
        "--block",
        f"--node-ip-address={LOOPBACK}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--node-manager-port={ports.node_manager}",
        f"--object-manager-port={ports.object_manager}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--resources={json.dumps(resources)}",
        f"--labels={NODE_LABEL}={name}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]


def _alive_node_id(head: StackInfo, name: str) -> str | None:
    """The id of the alive node labelled `lorafleet-node=<name>` (per the head's state API), if any."""
    url = f"{head.dashboard_url}/api/v0/nodes?limit=1000&detail=true"
    try:
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            nodes = client.get(url).json()["data"]["result"]["result"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    for node in nodes:
        if node.get("state") == "ALIVE" and (node.get("labels") or {}).get(NODE_LABEL) == name:
            return str(node["node_id"])
    return None


def _wait_joined(head: StackInfo, name: str, record: ProcessRecord, deadline: float) -> str | None:
    """The node's id once the head lists it alive; None if its `ray start` exited first or time ran out."""
    while time.monotonic() < deadline:
        node_id = _alive_node_id(head, name)
        if node_id is not None:
            return node_id
        if find_process(record) is None:
            return None
        time.sleep(0.5)
    return None


def add_node(head: StackInfo, *, num_cpus: int, resources: dict[str, float] | None = None, name: str | None = None,
             timeout: float = 180.0) -> WorkerNode:  # fmt: skip
    """Start a worker raylet joined to `head`, wait until the head lists it alive, and record it."""
    state = Path(head.state_dir)
    recorded = read_workers(state)
    name = name or f"w{len(recorded.nodes) + 1}"
    if any(n.name == name for n in recorded.nodes):
        raise StackError(f"name: a worker node named {name!r} is already recorded in {workers_file(state)}")
    avoid = (head.mlflow_port, head.serve_http_port, *head.ray_ports.model_dump().values())
    try:
        ports = ray_head.allocate_ports(head.ray_ports.gcs, head.ray_ports.dashboard, 64, avoid=avoid)
    except RuntimeError as exc:
        raise StackError(str(exc)) from exc
    temp_dir = ray_head.ray_temp_dir(state / "nodes" / name)
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = ray_head.head_env()  # loopback, no usage stats, no token auth: as the head
    env.setdefault("MLFLOW_TRACKING_URI", head.mlflow_url)
    cmd = worker_command(head, ports, name=name, num_cpus=num_cpus, resources=dict(resources or {}), temp_dir=temp_dir)
    log_path = state / "nodes" / name / "raylet.log"
    deadline = time.monotonic() + timeout
    node_id: str | None = None
    for attempt in range(1, START_ATTEMPTS + 1):
        record = spawn_in_new_session(cmd, env=env, log_path=log_path, cwd=temp_dir)
        node_id = _wait_joined(head, name, record, deadline)
        if node_id is not None:
            break
        stop_tree(record, graceful_timeout=5.0)
        why = last_log_line(log_path) or f"not alive within {timeout:.0f}s"
        if attempt == START_ATTEMPTS or time.monotonic() > deadline:
            raise StackError(f"worker node {name} did not join {head.ray_address}: {why}", log_path)
    assert node_id is not None  # the loop either found the node or raised
    node = WorkerNode(name=name, node_id=node_id, num_cpus=num_cpus, resources=dict(resources or {}), ports=ports,
                      temp_dir=str(temp_dir), process=record)  # fmt: skip
    _write_workers(state, WorkerNodes(nodes=[*read_workers(state).nodes, node]))
    return node


# --- stop ----------------------------------------------------------------------------------------------------


def _cleanup(state_dir: Path, node: WorkerNode) -> None:
    temp = Path(node.temp_dir)
    if not temp.is_relative_to(state_dir):  # a short /tmp path used for Ray's sockets
        shutil.rmtree(temp, ignore_errors=True)


def stop_node(state_dir: Path | str, name: str, graceful_timeout: float = 10.0) -> StopOutcome:
    """Stop one recorded worker node by PID and forget it."""
    state = Path(state_dir).expanduser().resolve()
    recorded = read_workers(state)
    node = next((n for n in recorded.nodes if n.name == name), None)
    if node is None:
        raise StackError(f"name: no worker node {name!r} in {workers_file(state)}")
    outcome = stop_tree(node.process, graceful_timeout=graceful_timeout)
    if not outcome.leftover_pids:
        _cleanup(state, node)
        _write_workers(state, WorkerNodes(nodes=[n for n in read_workers(state).nodes if n.name != name]))
    return outcome


def stop_all(state_dir: Path | str, graceful_timeout: float = 10.0) -> dict[str, StopOutcome]:
    """Stop every recorded worker node by PID (`lorafleet down` does this before stopping the head)."""
    state = Path(state_dir).expanduser().resolve()
    return {node.name: stop_node(state, node.name, graceful_timeout) for node in read_workers(state).nodes}


# --- `python -m cluster.worker_node <ray start args>` ---------------------------------------------------------


def main(argv: list[str]) -> None:
    """Ray's own `ray start` (same arguments), allowed to join a head while Ray stays on loopback."""
    from ray._private import ray_constants
    from ray.scripts import scripts

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise SystemExit("cluster.worker_node: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (keeps the node on loopback)")
    scripts.ray_constants = _JoinAllowed(ray_constants)  # type: ignore[assignment]
    scripts.cli.main(args=["start", *argv], prog_name="ray")


if __name__ == "__main__":
    main(sys.argv[1:])
