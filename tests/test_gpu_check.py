"""The GPU self-check (`python -m bench.gpu_check`): it and everything it imports load without Ray and MLflow (a
GPU machine with only torch, transformers, peft and triton has neither), and its CPU dry run (`--device cpu --tiny`)
runs every section end to end with Ray and MLflow made unimportable, writing a report whose figures check out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["bench.gpu_check", "bench.gpu_check_train", "jobs.train_loop", "jobs.cotrain_loop", "bench.serve_mixed",
           "bench.cotrain", "serve_app.engine"]  # fmt: skip


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH with stand-in `ray` and `mlflow` packages that refuse to import (children inherit it)."""
    for name in ("ray", "mlflow"):
        package = tmp_path / "blocked" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    path = os.pathsep.join([str(tmp_path / "blocked"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def test_the_self_check_imports_neither_ray_nor_mlflow(tmp_path: Path) -> None:
    code = ("import importlib, sys\n"
            "sys.modules['ray'] = None\nsys.modules['mlflow'] = None\n"
            f"for name in {MODULES!r}:\n    importlib.import_module(name)\n"
            "print('imported', len([m for m in sys.modules if m.startswith(('jobs.', 'bench.', 'adapters.'))]))\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("imported ")
    poisoned = subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None; import serve_app.app"],
                              capture_output=True, text=True, cwd=ROOT, check=False)  # fmt: skip
    assert poisoned.returncode != 0 and "ray" in poisoned.stderr  # the blocking itself works (Serve needs Ray)


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_section_without_ray_or_mlflow(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--tiny", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=_blocked_env(tmp_path), check=False)
    assert out.is_file(), done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = {k: v.get("error") for k, v in report.items() if isinstance(v, dict) and v.get("status") == "error"}
    assert done.returncode == 0 and not failed, failed
    assert report["meta"]["device"] == "cpu" and report["meta"]["tiny"] is True
    ours, reference = report["qlora"]["lorafleet"], report["qlora"]["hf_peft_bnb"]
    assert ours["steps"] == reference["steps"] == 6 and ours["loss_decreasing"] is True
    assert report["qlora"]["tokens_per_s_ratio"] == pytest.approx(ours["tokens_per_s"] / reference["tokens_per_s"])
    assert report["parity"]["ok"] is True and report["parity"]["autocast_dtype"] is None  # CPU: both runs fp32
    assert report["parity"]["max_relative_gap"] == 0.0
    assert report["equality"]["float32"]["all_equal"] is True and report["equality"]["float32"]["requests"] == 10
    cases = {row["key"] for row in report["serve"]["rows"]}
    assert {"engine-mixed-4", "peft-mixed"} <= cases, cases
    modes = {(row["mode"], row["k"]) for row in report["cotrain"]["rows"]}
    assert modes == {("cotrain", 2), ("concurrent", 2)}
