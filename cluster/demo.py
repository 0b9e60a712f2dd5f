"""The main job end to end on the embedded default: local stack -> sweep -> registry -> serve -> a request.

    python -m cluster.demo                                  # what `make demo` runs
    python -m cluster.demo --tasks date_normalisation,sentiment --config jobs/configs/cpu-smollm2.yaml

Every step uses the same public commands a user types, as subprocesses: `lorafleet up` (a real Ray head and MLflow
server), `ray job submit ... python -m jobs.sweep` (adapters trained on Ray, registered in MLflow), `serve deploy
serve_app/config.yaml` (the multiplexed endpoint), then one HTTP request per trained adapter and one to the bare
base model, printed side by side with the expected answer. The stack keeps running afterwards (`lorafleet down`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from cluster import local_stack
from cluster.stack_state import StackConfig, StackInfo

REPO_ROOT = Path(__file__).resolve().parents[1]
console = Console(highlight=False, soft_wrap=True)


def _run(command: list[str], env: dict[str, str]) -> None:
    console.print(f"\n[bold]$ {' '.join(command)}[/]")
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)


def _post_json(url: str, body: dict, timeout: float = 300.0) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for_serve(serve_url: str, timeout_s: float = 600.0) -> None:
    """Poll the app's /health until it answers 200 (replicas load the base model first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{serve_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise TimeoutError(f"the Serve app did not answer {serve_url}/health within {timeout_s:.0f}s (see `serve status`)")


def ask_each_adapter(info: StackInfo, tasks: list[str], base_model: str) -> None:
    """One chat request per adapter (its registry `champion`) and the same prompt to the base model."""
    from jobs.tasks import get_task, load_split

    table = Table(title="One eval-split example per task, over HTTP", show_lines=True)
    for column in ("model", "input", "expected", "adapter answer", "base answer"):
        table.add_column(column, overflow="fold")
    for name in tasks:
        task = get_task(name)
        row = load_split(name, "eval")[0]
        answers = []
        for model in (name, base_model):
            body = {"model": model, "messages": task.messages(row), "max_tokens": 64, "temperature": 0}
            reply = _post_json(f"{info.serve_url}/v1/chat/completions", body)
            answers.append(reply["choices"][0]["message"]["content"].strip())
        table.add_row(name, row["input"], row["output"], *answers)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/cpu-smollm2.yaml", help="sweep config")
    parser.add_argument("--tasks", default="", help="comma-separated subset of the config's tasks")
    parser.add_argument("--serve-config", default="serve_app/config.yaml")
    args = parser.parse_args()

    info = local_stack.up(StackConfig())
    console.print(f"[bold green]local stack[/]: Ray {info.dashboard_url}  MLflow {info.mlflow_url}")
    venv_bin = str(Path(sys.executable).parent)  # `ray` and `serve` live next to this interpreter
    env = {**os.environ, **info.client_env(), "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}

    sweep = ["python", "-m", "jobs.sweep", "--config", args.config]
    if args.tasks:
        sweep += ["--set", f"tasks=[{args.tasks}]"]
    submit = ["ray", "job", "submit", "--address", info.dashboard_url, "--runtime-env", "cluster/runtime_env.yaml"]
    _run([*submit, "--", *sweep], env)

    _run(["serve", "deploy", args.serve_config, "--address", info.dashboard_url], env)
    wait_for_serve(info.serve_url)

    from jobs.config import load_config

    config = load_config(REPO_ROOT / args.config)
    tasks = args.tasks.split(",") if args.tasks else config.task_names()
    serve_args = yaml.safe_load((REPO_ROOT / args.serve_config).read_text())["applications"][0].get("args", {})
    ask_each_adapter(info, tasks, serve_args.get("base_model", config.base_model))
    console.print(
        f"\n[bold]Next[/]: MLflow UI {info.mlflow_url} (experiment '{config.mlflow.experiment}'), Ray dashboard "
        f"{info.dashboard_url}, endpoint {info.serve_url}/v1 (model=<task>).  Stop everything: lorafleet down"
    )


if __name__ == "__main__":
    main()
