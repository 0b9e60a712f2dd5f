"""The local stack's Ray head: `ray start --head --block` on loopback with every port pinned, run as a child in its
own session so that `lorafleet down` can stop it (and everything it spawned) by PID.

Used by `cluster/local_stack.py`; run the stack with `lorafleet up` / `python -m cluster.cli up`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import psutil
from pydantic import BaseModel, ConfigDict

from cluster.processes import (
    LOOPBACK,
    ProcessRecord,
    ephemeral_port_range,
    http_ok,
    port_is_free,
    port_is_listening,
    spawn_in_new_session,
)

# Unix socket paths are limited to 107 bytes; Ray puts e.g.
# "<temp>/session_2026-11-23_09-15-08_366656_4148/sockets/dash_MetricsHead" (temp + 65) under its temp dir.
MAX_RAY_TEMP_DIR_CHARS = 36
# Ports Ray picks by itself (and `ray start` defaults: 10001-19999, 52365) are avoided by taking a block from here.
_AUX_PORT_WINDOW = (20000, 32767)
_AUX_NAMES = (
    "ray_client_server",
    "dashboard_agent_listen",
    "dashboard_agent_grpc",
    "node_manager",
    "object_manager",
    "metrics_export",
    "runtime_env_agent",
)


class RayPorts(BaseModel):
    """Every port a Ray head binds. Pinned so that two heads on one machine (a user's and a test's) never collide."""

    model_config = ConfigDict(extra="forbid")

    gcs: int
    dashboard: int
    ray_client_server: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    node_manager: int
    object_manager: int
    metrics_export: int
    runtime_env_agent: int
    min_worker: int
    max_worker: int


def venv_bin() -> Path:
    """The `bin` folder of the interpreter running lorafleet (the venv's, when run from one)."""
    return Path(sys.executable).parent


def ray_executable() -> str:
    candidate = venv_bin() / "ray"
    return str(candidate) if candidate.exists() else "ray"


def ray_temp_dir(state_dir: Path) -> Path:
    """`<state_dir>/ray`, or a short /tmp path derived from it when that is too long for Ray's Unix sockets."""
    preferred = state_dir / "ray"
    if len(str(preferred)) <= MAX_RAY_TEMP_DIR_CHARS:
        return preferred
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
    return Path("/tmp") / f"lorafleet-ray-{digest}"


def _ranges_used_by_other_raylets() -> list[tuple[int, int]]:
    """Worker-port ranges (plus the block just below, where we put aux ports) of every raylet running here."""
    used: list[tuple[int, int]] = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(proc.cmdline())
            low = re.search(r"--min_worker_port=(\d+)", cmd)
            high = re.search(r"--max_worker_port=(\d+)", cmd)
            if low and high and int(low.group(1)) > 0:
                used.append((int(low.group(1)) - 2 * len(_AUX_NAMES), int(high.group(1))))
    return used


def allocate_ports(gcs: int, dashboard: int, worker_port_count: int, avoid: Iterable[int] = ()) -> RayPorts:
    """Pin the auxiliary ports: one contiguous free block below the ephemeral range, away from other raylets and
    from `avoid`, holding the 7 auxiliary ports followed by `worker_port_count` worker ports."""
    size = len(_AUX_NAMES) + worker_port_count
    low, high = _AUX_PORT_WINDOW
    eph_low, _ = ephemeral_port_range()
    if low + size <= eph_low <= high:  # keep clear of ports the kernel hands to outgoing connections
        high = eph_low - 1
    starts = list(range(low, high - size + 2, size))
    random.SystemRandom().shuffle(starts)
    taken = _ranges_used_by_other_raylets()
    reserved = {gcs, dashboard, *avoid}
    for start in starts:
        block = range(start, start + size)
        if any(start <= t_high and block[-1] >= t_low for t_low, t_high in taken):
            continue
        if reserved.intersection(block) or not all(port_is_free(p) for p in block):
            continue
        aux = dict(zip(_AUX_NAMES, block, strict=False))
        return RayPorts(gcs=gcs, dashboard=dashboard, min_worker=start + len(_AUX_NAMES), max_worker=block[-1], **aux)
    raise RuntimeError(f"no block of {size} free ports in {low}-{high} for the Ray head's auxiliary ports")


def head_command(ports: RayPorts, *, num_cpus: int, num_gpus: int | None, temp_dir: Path) -> list[str]:
    cmd = [
        ray_executable(),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={LOOPBACK}",
        f"--port={ports.gcs}",
        "--include-dashboard=true",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={ports.dashboard}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--node-manager-port={ports.node_manager}",
        f"--object-manager-port={ports.object_manager}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--ray-client-server-port={ports.ray_client_server}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    return cmd


def head_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the head (inherited by raylet, workers and `ray job submit` drivers)."""
    env = dict(os.environ if base is None else base)
    env.pop("RAY_ADDRESS", None)  # a user's RAY_ADDRESS must not redirect the head or its drivers
    bin_dir = str(venv_bin())
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps the node on 127.0.0.1 (see shared/README.md)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.60 turns token auth on once any local `ray.init()`/`serve run` has written ~/.ray/auth_token; the stack
    # listens on 127.0.0.1 only, and our health checks and CLIs would be refused. Export it as "token" to opt in.
    env.setdefault("RAY_AUTH_MODE", "disabled")
    # On SIGTERM the head first drains the node, waiting up to this long for running tasks (Ray's default: 30 s).
    # Locally there is nothing to hand work over to, so keep `down` quick.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "3")
    return env


def start_head(
    ports: RayPorts,
    *,
    num_cpus: int,
    num_gpus: int | None,
    temp_dir: Path,
    log_path: Path,
    mlflow_url: str | None = None,
) -> ProcessRecord:
    """Start the head. `mlflow_url` becomes MLFLOW_TRACKING_URI of the head (unless the caller's environment sets
    one), so every job, trial, worker and Serve replica of the stack resolves the same MLflow by default."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    cmd = head_command(ports, num_cpus=num_cpus, num_gpus=num_gpus, temp_dir=temp_dir)
    env = head_env()
    if mlflow_url:
        env.setdefault("MLFLOW_TRACKING_URI", mlflow_url)
    return spawn_in_new_session(cmd, env=env, log_path=log_path, cwd=temp_dir)


def dashboard_url(ports: RayPorts) -> str:
    return f"http://{LOOPBACK}:{ports.dashboard}"


def head_ready(ports: RayPorts) -> bool:
    """The dashboard answers, its job API (what `ray job submit` talks to) answers, and the raylet listens."""
    url = dashboard_url(ports)
    return http_ok(f"{url}/api/version") and http_ok(f"{url}/api/jobs/") and port_is_listening(ports.node_manager)
