"""The README's path resolves one MLflow (issue 18 item 1): on a stack started by `lorafleet up` (the session's
`local_stack`), a job submitted as the README does (`ray job submit --runtime-env cluster/runtime_env.yaml`, no
MLFLOW_TRACKING_URI anywhere on the submitting side) and a Ray actor it starts (what Serve replicas are) both
resolve the stack's MLflow, through the same settings the sweep (`jobs.config.MlflowSettings`) and the Serve app
(`serve_app.app_config.ServeAppConfig`, `mlflow_tracking_uri: null` as in serve_app/config.yaml) use.

    .venv/bin/python -m pytest -q tests/test_stack_mlflow_uri.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.stack_state import StackInfo

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")

PROBE = """
import json, os, ray
from jobs.config import MlflowSettings
from serve_app.app_config import ServeAppConfig

@ray.remote(num_cpus=0)
class Probe:
    def uris(self):
        return {"actor_env": os.environ.get("MLFLOW_TRACKING_URI"), "actor_sweep": MlflowSettings().uri(),
                "actor_serve": ServeAppConfig().resolved_mlflow_uri()}

ray.init()
found = {"driver_env": os.environ.get("MLFLOW_TRACKING_URI"), "driver_sweep": MlflowSettings().uri()}
found.update(ray.get(Probe.remote().uris.remote()))
print("URIS " + json.dumps(found), flush=True)
"""


def test_jobs_and_actors_on_the_stack_resolve_its_mlflow(local_stack: StackInfo) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    command = [RAY, "job", "submit", "--address", local_stack.dashboard_url, "--runtime-env",
               "cluster/runtime_env.yaml", "--", "python", "-c", PROBE]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    line = next((x for x in out.splitlines() if x.startswith("URIS ")), None)
    assert line is not None, out[-3000:]
    found = json.loads(line.removeprefix("URIS "))
    assert found == dict.fromkeys(found, local_stack.mlflow_url) and len(found) == 5, found
