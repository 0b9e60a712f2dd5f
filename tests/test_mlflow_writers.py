"""16 concurrent writers (one MLflow run each, as 16 adapters training at once) log every step to one real local
`mlflow server`; every point is read back and no run fails. The full-size run with latency figures is
`python -m bench.mlflow_writers` (bench/RESULTS.md); this is the same code on fewer steps.

    pytest tests/test_mlflow_writers.py
"""

from __future__ import annotations

import pytest

from bench.mlflow_writers import run_bench


@pytest.mark.slow
def test_sixteen_concurrent_writers_lose_no_point_and_fail_no_run() -> None:
    result = run_bench(writers=16, steps=15, metrics_per_step=3)
    assert result.errors == [] and result.failed_runs == 0
    assert result.points_logged == 16 * 15 * 3 and result.points_lost == 0
    assert 0 < result.latency_ms_p50 <= result.latency_ms_p99 <= result.latency_ms_max
