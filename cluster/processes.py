"""Process and port helpers for lorafleet's local stack (`lorafleet up` / `down`).

Starts a server in its own session and records it by PID + start time, checks it by PID, stops its whole process
tree by PID (never by process name), waits for HTTP endpoints, and finds free loopback ports. Used by
`cluster/ray_head.py`, `cluster/mlflow_server.py` and `cluster/local_stack.py`; it has no command line of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import httpx
import psutil
from pydantic import BaseModel, ConfigDict

LOOPBACK = "127.0.0.1"
# PIDs are recycled; a recorded process is "ours" only if its start time matches the recorded one.
_CREATE_TIME_TOLERANCE_S = 1.0


class ProcessRecord(BaseModel):
    """A process we started in its own session: its PID is also its process-group and session id."""

    model_config = ConfigDict(extra="forbid")

    pid: int
    create_time: float
    command: list[str]
    log_path: str


class StopOutcome(BaseModel):
    """What stopping one process tree took."""

    model_config = ConfigDict(extra="forbid")

    was_running: bool
    stopped_pids: list[int] = []
    killed_pids: list[int] = []  # needed SIGKILL
    leftover_pids: list[int] = []  # still alive after SIGKILL (should always be empty)
    seconds: float = 0.0


def spawn_in_new_session(
    command: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> ProcessRecord:
    """Start `command` detached from our terminal (own session and process group), output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(command),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:  # exited (and was reaped) already; the health wait will report it
        create_time = time.time()
    return ProcessRecord(pid=proc.pid, create_time=create_time, command=list(command), log_path=str(log_path))


def _reap(pid: int) -> bool:
    """Collect `pid`'s exit status if it is our own child, so it does not linger as a zombie. False only when it is
    our child and has not finished exiting (Linux shows a multi-threaded process as a zombie while its other
    threads are still going down; `waitpid` is the authority)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except OSError:  # ChildProcessError: not our child (its own parent or init reaps it)
        return True
    return done == pid


def _is_running(proc: psutil.Process) -> bool:
    try:
        if not proc.is_running():
            _reap(proc.pid)
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            return not _reap(proc.pid)
        return True
    except psutil.Error:
        return False


def find_process(record: ProcessRecord) -> psutil.Process | None:
    """The live process behind `record`, or None if it exited or its PID now belongs to someone else."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > _CREATE_TIME_TOLERANCE_S:
            return None
    except psutil.Error:
        return None
    return proc if _is_running(proc) else None


def tree_members(record: ProcessRecord) -> list[psutil.Process]:
    """Every live process that belongs to the tree we started: the leader, its descendants, and anything still in
    its session (session id == leader PID; this also finds orphans whose parent already exited)."""
    found: dict[int, psutil.Process] = {}
    leader = find_process(record)
    if leader is not None:
        found[leader.pid] = leader
        with contextlib.suppress(psutil.Error):
            for child in leader.children(recursive=True):
                found[child.pid] = child
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid in found or proc.pid == me:
            continue
        try:
            if (
                os.getsid(proc.pid) == record.pid
                and proc.create_time() >= record.create_time - _CREATE_TIME_TOLERANCE_S
            ):
                found[proc.pid] = proc
        except (OSError, psutil.Error):
            continue
    return [p for p in found.values() if _is_running(p)]


def _wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` seconds for `procs` to exit (zombies count as gone); returns the ones still running."""
    alive = [p for p in procs if _is_running(p)]
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _is_running(p)]
    return alive


def _signal_all(procs: Iterable[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def stop_tree(record: ProcessRecord, *, graceful_timeout: float = 30.0, term_timeout: float = 5.0) -> StopOutcome:
    """Stop everything `record` started, by PID only.

    1. SIGTERM the leader alone and give it `graceful_timeout` to shut its children down in order
       (`ray start --block` and `mlflow server` both do).
    2. SIGTERM its process group and every remaining member by PID; wait `term_timeout`.
    3. SIGKILL whatever is left (members re-scanned, so late-spawned children are included); wait again.
    """
    start = time.monotonic()
    leader = find_process(record)
    members = tree_members(record)
    if not members:
        return StopOutcome(was_running=False)
    pids = sorted(p.pid for p in members)
    if leader is not None:
        with contextlib.suppress(psutil.Error):
            leader.send_signal(signal.SIGTERM)
        alive = _wait_gone(members, graceful_timeout)
    else:
        alive = members
    if alive:
        if find_process(record) is not None:  # leader still ours: its group id is record.pid
            with contextlib.suppress(OSError):
                os.killpg(record.pid, signal.SIGTERM)
        _signal_all(alive, signal.SIGTERM)
        alive = _wait_gone(alive, term_timeout)
    killed: list[int] = []
    remaining = {p.pid: p for p in alive}
    remaining.update({p.pid: p for p in tree_members(record)})
    if remaining:
        killed = sorted(remaining)
        _signal_all(remaining.values(), signal.SIGKILL)
        _wait_gone(remaining.values(), term_timeout)
    leftover = sorted(p.pid for p in tree_members(record))
    _reap(record.pid)
    return StopOutcome(
        was_running=True,
        stopped_pids=sorted(set(pids) | set(killed)),
        killed_pids=killed,
        leftover_pids=leftover,
        seconds=round(time.monotonic() - start, 2),
    )


def tree_memory_mb(record: ProcessRecord) -> float:
    """Memory of the whole tree in MiB: proportional set size (shared pages split fairly), RSS where PSS is unknown."""
    total = 0
    for proc in tree_members(record):
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
    return round(total / 2**20, 1)


def last_log_line(log_path: Path | str, max_chars: int = 200) -> str:
    """The last non-empty line of a log file (for one-line error messages)."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:max_chars] if lines else ""


# --- ports ---------------------------------------------------------------------------------------------------


def port_is_free(port: int, host: str = "") -> bool:
    """True if nothing is bound/listening on `port` (checked on all interfaces unless `host` is given).

    SO_REUSEADDR makes sockets left in TIME_WAIT by a server we just stopped count as free, as the servers
    themselves treat them."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_is_listening(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def port_owner(port: int) -> str:
    """'pid N (name)' of the process listening on `port`, or '' if unknown (best effort, for error messages)."""
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                with contextlib.suppress(psutil.Error):
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                return f"pid {conn.pid}"
    except (psutil.Error, OSError):
        pass
    return ""


def ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# --- HTTP readiness ------------------------------------------------------------------------------------------


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True if GET `url` answers 2xx. Proxies from the environment are ignored (everything here is loopback)."""
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as client:
            return client.get(url).is_success
    except httpx.HTTPError:
        return False


def wait_until(
    ready: Callable[[], bool], *, timeout: float, still_starting: Callable[[], bool], interval: float = 0.25
) -> bool:
    """Poll `ready()` until it is true (-> True), `still_starting()` turns false, or `timeout` passes (-> False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if not still_starting():
            return ready()
        time.sleep(interval)
    return ready()
