"""MLflow at sweep scale: N concurrent writers (one MLflow run each, as N adapters training at once) log every step
to one real local `mlflow server` (the local stack's: sqlite backend, one worker); then every point is read back.

    python -m bench.mlflow_writers [--writers 16] [--steps 200] [--metrics 3] [--json OUT]

Each writer is a thread with its own `MlflowClient` sending one `log_batch` per step (what jobs/ray_train.py's
RayHooks sends per step); the latency of each call is recorded. Reports p50/p99/max latency, lost points (logged
but missing or different on read-back) and failed runs, and the same for one writer alone (the baseline, run first
on its own fresh server). Results and the command: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class WritersResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    writers: int
    steps: int
    metrics_per_step: int
    points_logged: int
    points_lost: int
    failed_runs: int
    errors: list[str]
    latency_ms_p50: float
    latency_ms_p99: float
    latency_ms_max: float
    wall_s: float


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _writer(url: str, run_id: str, steps: int, names: list[str], latencies: list[float], errors: list[str]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(url)
    try:
        for step in range(1, steps + 1):
            now = int(time.time() * 1000)
            batch = [Metric(name, step * 10.0 + i, now, step) for i, name in enumerate(names)]
            start = time.perf_counter()
            client.log_batch(run_id, metrics=batch)
            latencies.append((time.perf_counter() - start) * 1000)
        client.set_terminated(run_id, "FINISHED")
    except Exception as err:  # a failed run is what this measures
        errors.append(f"{run_id}: {err.__class__.__name__}: {err}")
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")


def _lost_points(client: Any, run_id: str, steps: int, names: list[str]) -> int:
    lost = 0
    for i, name in enumerate(names):
        got = {m.step: m.value for m in client.get_metric_history(run_id, name)}
        lost += sum(1 for step in range(1, steps + 1) if got.get(step) != step * 10.0 + i)
    return lost


def run_bench(writers: int = 16, steps: int = 200, metrics_per_step: int = 3) -> WritersResult:
    """Start a real MLflow server in a temp dir, run the writers, read every point back, stop the server by PID."""
    from mlflow import MlflowClient

    from cluster import mlflow_server
    from cluster.processes import stop_tree, wait_until

    names = [f"m{i}" for i in range(metrics_per_step)]
    with tempfile.TemporaryDirectory(prefix="lorafleet-mlflow-bench-") as tmp:
        state, port = Path(tmp), _free_port()
        record = mlflow_server.start_server(state, port, state / "server.log")
        try:
            if not wait_until(lambda: mlflow_server.server_ready(port), timeout=180, still_starting=lambda: True):
                raise RuntimeError(f"mlflow server did not answer within 180 s (log: {state / 'server.log'})")
            url = mlflow_server.mlflow_url(port)
            client = MlflowClient(url)
            experiment = client.create_experiment("writers")
            run_ids = [client.create_run(experiment, run_name=f"writer-{i}").info.run_id for i in range(writers)]
            latencies: list[float] = []
            errors: list[str] = []
            threads = [threading.Thread(target=_writer, args=(url, r, steps, names, latencies, errors))
                       for r in run_ids]  # fmt: skip
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
            lost = sum(_lost_points(client, r, steps, names) for r in run_ids)
            failed = sum(1 for r in run_ids if client.get_run(r).info.status != "FINISHED")
        finally:
            stop_tree(record, graceful_timeout=10)
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return WritersResult(writers=writers, steps=steps, metrics_per_step=metrics_per_step,
                         points_logged=writers * steps * metrics_per_step, points_lost=lost, failed_runs=failed,
                         errors=errors[:5], latency_ms_p50=round(cuts[49], 1), latency_ms_p99=round(cuts[98], 1),
                         latency_ms_max=round(max(latencies, default=0.0), 1), wall_s=round(wall, 1))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--metrics", type=int, default=3, help="metrics per step (loss, lr, tokens/s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    baseline = run_bench(1, args.steps, args.metrics)  # one writer alone on its own server: the same run's baseline
    result = run_bench(args.writers, args.steps, args.metrics)
    report = {"baseline_1_writer": baseline.model_dump(), "concurrent": result.model_dump(),
              "p50_ratio_vs_1_writer": round(result.latency_ms_p50 / max(baseline.latency_ms_p50, 1e-9), 2),
              "p99_ratio_vs_1_writer": round(result.latency_ms_p99 / max(baseline.latency_ms_p99, 1e-9), 2)}  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
