"""A real PostgreSQL server for tests, offline: the binaries of the `pgserver` wheel (dev extra; PostgreSQL 16 in a
wheel) or, failing that, a system install (`initdb` on PATH or /usr/lib/postgresql/*/bin). `postgres()` runs
initdb in a fresh temp folder and starts the server on a free loopback port (trust auth, fsync off: a throwaway
database), as a child in its own session stopped by PID (cluster/processes.py). PostgreSQL refuses to run as root:
under root it runs as the unprivileged `nobody` user. `postgres_binaries()` / `why_no_postgres()` let a test skip
with a precise reason. No fixtures, nothing runs at import.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cluster.processes import LOOPBACK, spawn_in_new_session, stop_tree

UNPRIVILEGED = "nobody"


def postgres_binaries() -> Path | None:
    """The folder holding `initdb` and `postgres`: pgserver's wheel first, then a system install."""
    spec = importlib.util.find_spec("pgserver")  # located, not imported: its import registers atexit hooks
    candidates = [Path(p) / "pginstall" / "bin" for p in (spec.submodule_search_locations or [])] if spec else []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((c for c in candidates if (c / "initdb").exists() and (c / "postgres").exists()), None)


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(UNPRIVILEGED)
    return entry.pw_uid, entry.pw_gid


def why_no_postgres() -> str | None:
    """None when `postgres()` can run here, else the reason (for pytest.skip)."""
    binaries = postgres_binaries()
    if binaries is None:
        return "no PostgreSQL binaries: install the dev extra (pgserver wheel) or Debian's postgresql"
    if os.geteuid() == 0:
        try:
            ids = _run_as()
        except KeyError:
            return f"running as root and no '{UNPRIVILEGED}' user to run PostgreSQL as (it refuses root)"
        probe = subprocess.run(_as_user([str(binaries / "initdb"), "--version"], ids), capture_output=True, timeout=30)
        if probe.returncode != 0:
            return f"running as root; user '{UNPRIVILEGED}' cannot run {binaries / 'initdb'} (or this Python)"
    return None


def _as_user(command: list[str], ids: tuple[int, int] | None) -> list[str]:
    """`command`, exec'd after dropping to `ids` (uid, gid) when given."""
    if ids is None:
        return command
    drop = f"import os, sys; os.setgroups([]); os.setgid({ids[1]}); os.setuid({ids[0]}); os.execv(sys.argv[1], sys.argv[1:])"
    return [sys.executable, "-c", drop, *command]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgres(database: str, timeout_s: float = 60.0) -> Iterator[str]:
    """A fresh PostgreSQL with `database` created; yields `postgresql://postgres@127.0.0.1:<port>/<database>`."""
    import psycopg

    binaries = postgres_binaries()
    if binaries is None:
        raise RuntimeError(why_no_postgres())
    ids = _run_as()
    # Under /tmp, not pytest's tmp_path: that one is private to our user (0700), which `nobody` cannot enter.
    root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
    data, log = root / "data", root / "postgres.log"
    if ids is not None:
        os.chown(root, *ids)
    record = None
    try:
        initdb = [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8"]
        subprocess.run(_as_user([*initdb, "--no-sync"], ids), check=True, capture_output=True, text=True, timeout=120)
        port = _free_port()
        command = _as_user([str(binaries / "postgres"), "-D", str(data), "-h", LOOPBACK, "-p", str(port), "-k",
                            str(root), "-c", "fsync=off", "-c", "full_page_writes=off"], ids)  # fmt: skip
        record = spawn_in_new_session(command, env=dict(os.environ), log_path=log)
        url = f"postgresql://postgres@{LOOPBACK}:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                connection = psycopg.connect(f"{url}/postgres", connect_timeout=2, autocommit=True)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start: {log.read_text(errors='replace')[-2000:]}") from None
                time.sleep(0.2)
        with connection:
            connection.execute(f'CREATE DATABASE "{database}"')
        yield f"{url}/{database}"
    finally:
        if record is not None:
            stop_tree(record, graceful_timeout=15.0)
        shutil.rmtree(root, ignore_errors=True)
