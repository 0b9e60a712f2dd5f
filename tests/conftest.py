"""Shared pytest fixtures and helpers for lorafleet's tests.

Run from the repo root: `pytest` (everything; `slow` tests start real Ray / MLflow processes) or
`pytest -m "not slow"` (quick ones only).

- `free_port()` / `free_ports(n)`: free loopback ports (plain helpers, also returned by the `port_picker` fixture).
- `local_stack_config` / `local_stack` (session scope): a real Ray head + MLflow server on free loopback ports in a
  tmp state dir, `num_cpus=4`; stopped by PID at the end of the session. `local_stack` yields its `StackInfo`.
- `tiny_base` / `tiny_shapes` / `smollm2_base` (session scope): loaded base models.
- Environment for the whole session (set in `pytest_configure`): see `TEST_ENV`.
- Tests marked `gpu` are skipped unless `torch.cuda.is_available()` (`pytest_collection_modifyitems`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cluster.local_stack import StackConfig, StackInfo

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    # Drivers in the test process (`ray.init(address=local_stack.ray_address)`) stay on 127.0.0.1 (shared/README.md).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # A ~/.ray/auth_token left by any earlier local `ray.init()` would switch the stack's heads to token auth.
    "RAY_AUTH_MODE": "disabled",
}


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(TEST_ENV)
    # Make the project importable under a bare `pytest` too (pyproject has no `pythonpath` setting).
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu`-marked tests are skipped where CUDA is not available (torch imported only if there are any)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)


# --- ports ---------------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that are free right now (all held open while picking, so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port() -> int:
    """One free loopback port."""
    return free_ports(1)[0]


@pytest.fixture
def port_picker() -> Callable[[int], list[int]]:
    """`free_ports` as a fixture, for test modules that should not import from conftest."""
    return free_ports


# --- the shared local stack ----------------------------------------------------------------------------------


def _log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def local_stack_config(tmp_path_factory: pytest.TempPathFactory) -> StackConfig:
    """Config of the session's stack: own tmp state dir, free loopback ports, 4 logical CPUs."""
    from cluster.local_stack import StackConfig

    gcs, dashboard, mlflow, serve = free_ports(4)
    return StackConfig(
        state_dir=tmp_path_factory.mktemp("lorafleet-stack"),
        ray_gcs_port=gcs,
        dashboard_port=dashboard,
        mlflow_port=mlflow,
        serve_http_port=serve,
        num_cpus=4,
        startup_timeout_s=240,
    )


@pytest.fixture(scope="session")
def local_stack(local_stack_config: StackConfig) -> Iterator[StackInfo]:
    """A running Ray head + MLflow server for the whole session; torn down by PID (never by name) at the end."""
    from cluster.local_stack import StackError, down, up

    try:
        info = up(local_stack_config)
    except StackError as exc:
        down(local_stack_config)
        pytest.fail(f"local stack did not start: {exc}\n--- {exc.log_path} ---\n{_log_tail(exc.log_path)}")
    try:
        yield info
    finally:
        report = down(local_stack_config)
        ray_temp = Path(info.ray_temp_dir)
        if not ray_temp.is_relative_to(info.state_dir):  # short /tmp path used for Ray's sockets
            shutil.rmtree(ray_temp, ignore_errors=True)
        assert not report.leftover_pids, f"stack processes survived down(): {report.leftover_pids}"


# --- models ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_base():
    """The tiny random Llama (built deterministically on first use), loaded once per session."""
    from adapters.base_models import load_base

    return load_base("tiny-llama")


@pytest.fixture(scope="session")
def tiny_shapes(tiny_base):
    from adapters.lora_files import BaseShapes

    return BaseShapes.from_config(tiny_base.model.config, tiny_base.fingerprint, tiny_base.name)


@pytest.fixture(scope="session")
def smollm2_base():
    """SmolLM2-135M-Instruct, converted from its GGUF on first use (~45 s), loaded once per session."""
    from adapters.base_models import load_base

    return load_base("smollm2-135m")
