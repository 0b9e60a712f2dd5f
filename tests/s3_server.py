"""A real S3-compatible server for tests, offline: moto's S3 server (`python -m moto.server`, from the `dev` extra)
started as a child process on a free loopback port in its own session, stopped by PID (cluster/processes.py).

`moto_s3()` yields its endpoint URL; `s3_env(endpoint)` is the environment a user would set to point boto3, s3fs
and pyarrow at an S3-compatible store (`AWS_ENDPOINT_URL` + keys + region). No fixtures, nothing runs at import.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cluster.processes import LOOPBACK, http_ok, spawn_in_new_session, stop_tree

KEYS = {"AWS_ACCESS_KEY_ID": "lorafleet-test", "AWS_SECRET_ACCESS_KEY": "lorafleet-test-secret"}


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS settings for an S3-compatible endpoint (botocore >= 1.31, s3fs, pyarrow >= 15 read them)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", **KEYS}


@contextlib.contextmanager
def moto_s3(log_dir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """A moto S3 server on a free loopback port; yields `http://127.0.0.1:<port>`, stopped by PID on exit."""
    port = free_loopback_port()
    command = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]
    record = spawn_in_new_session(command, env={**_base_env(), **KEYS}, log_path=log_dir / "moto.log")
    endpoint = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not http_ok(f"{endpoint}/moto-api/"):
            if time.monotonic() > deadline:
                tail = (log_dir / "moto.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"moto S3 server did not answer on {endpoint} in {timeout_s} s:\n{tail}")
            time.sleep(0.2)
        yield endpoint
    finally:
        stop_tree(record, graceful_timeout=5.0)


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
