"""Test helpers: a real `mlflow server` on a free loopback port (stopped by PID), and a finished sweep recorded in
it the way a sweep's trials and driver record one (`jobs.tracking.SweepTracker`: parent run, one run and registry
version per adapter, champion alias, summary table, leaderboard chart), with random adapters on the tiny base
instead of trained ones. Used by tests/test_mlflow_pyfunc.py and tests/test_mlflow_browser.py.

    python -c "import tests.mlflow_sweep"   # nothing to run on its own
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SYSTEM = "Answer in one word."
TASKS = ("sentiment", "date_normalisation")


@contextlib.contextmanager
def mlflow_server(state: Path) -> Iterator[str]:
    """The server's URL while the block runs."""
    from cluster import mlflow_server as server
    from cluster.processes import stop_tree
    from tests.conftest import free_port

    port = free_port()
    record = server.start_server(state, port, state / "server.log")
    try:
        deadline = time.monotonic() + 120
        while not server.server_ready(port):
            assert time.monotonic() < deadline, (state / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield server.mlflow_url(port)
    finally:
        stop_tree(record)


def record_sweep(url: str, folder: Path, shapes: Any, name: str = "pyfunc") -> dict[str, Any]:
    """One adapter per task of TASKS finished and registered, then the parent run closed. Adapter i scores
    30 + 10 i against a base of 10; each was 'trained' with the chat system prompt SYSTEM."""
    from adapters.prompt_format import PromptFormat
    from adapters.random_adapter import write_random_adapter
    from jobs.config import SweepConfig
    from jobs.leaderboard import plot
    from jobs.sweep import summary_rows
    from jobs.tracking import SweepTracker

    config = SweepConfig.model_validate({"name": name, "base_model": "tiny-llama", "tasks": list(TASKS),
                                         "mlflow": {"tracking_uri": url, "experiment": name,
                                                    "registry_prefix": "pf-"}})  # fmt: skip
    tracker = SweepTracker(url, name)
    parent = tracker.parent_run(config)
    fmt = PromptFormat(mode="chat", system_prompt=SYSTEM, stop=[], format="input_output")
    specs, adapters, runs, versions = config.trials(), {}, {}, {}
    for i, spec in enumerate(specs):
        adapter = write_random_adapter(folder / spec.adapter_name, shapes, rank=4, seed=5 + i)
        fmt.write(adapter)
        outcome = {"base_score": 10.0, "adapter_score": 30.0 + 10 * i, "train_seconds": 4.0, "tokens_per_s": 900.0,
                   "peak_memory_mb": 100.0, "steps": 6, "train_loss": 1.5, "epochs": 0.5,
                   "prompt_format": fmt.model_dump(), "examples": []}  # fmt: skip
        run_id, _ = tracker.child_run(parent, spec, "f" * 16)
        metric = spec.task_config.metric.name
        versions[spec.task] = tracker.finish_child(run_id, spec, outcome, adapter, metric, register=True)
        adapters[spec.task], runs[spec.task] = adapter, run_id
    rows = summary_rows(tracker, parent, specs)
    tracker.finish_parent(parent, rows, plot(rows, folder / "leaderboard.png", name))
    return {"tracker": tracker, "parent": parent, "runs": runs, "versions": versions, "adapters": adapters,
            "models": {s.task: s.registered_model for s in specs}, "experiment_id": tracker.experiment_id}  # fmt: skip
