"""Leak checks for tests that start a local stack: every process that belongs to it (by process tree and by what its
command line names), and which of those are still alive (same pid and start time). No fixtures, nothing runs at
import; used by tests/test_local_stack.py and tests/test_readme_commands.py.
"""

from __future__ import annotations

import os

import psutil

from cluster.processes import tree_members
from cluster.stack_state import StackInfo


def stack_processes(info: StackInfo) -> dict[int, float]:
    """pid -> create time of everything belonging to the stack: both process trees (by session), plus anything
    whose command line names the stack's state dir, Ray temp dir or GCS address (a leak check that does not
    trust the session bookkeeping)."""
    found = {p.pid: p.create_time() for rec in (info.ray, info.mlflow) for p in tree_members(rec)}
    markers = (str(info.state_dir), str(info.ray_temp_dir), f"127.0.0.1:{info.ray_ports.gcs}")
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and any(m in cmd for m in markers):
            found[proc.pid] = proc.info["create_time"]
    return found


def still_running(procs: dict[int, float]) -> list[int]:
    """The pids of `procs` that are still the same live process (not reused, not a zombie)."""
    alive = []
    for pid, created in procs.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive
