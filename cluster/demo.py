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


class DemoStepFailed(RuntimeError):
    """A step's command exited non-zero; its own output (above) says why."""


def _run(command: list[str], env: dict[str, str]) -> None:
    console.print(f"\n$ {' '.join(command)}", style="bold", markup=False)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env)
    if result.returncode != 0:
        raise DemoStepFailed(f"`{' '.join(command[:3])} ...` exited with {result.returncode} (its output is above)")


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


def ask_each_adapter(serve_url: str, tasks: list[str], base_model: str) -> None:
    """One chat request per adapter (its registry `champion`) and the same prompt to the base model: only the user's
    text, as a client sends it (each adapter is served with the system prompt it was trained with)."""
    from jobs.tasks import load_split

    table = Table(title="One eval-split example per task, over HTTP", show_lines=True)
    for column in ("model", "input", "expected", "adapter answer", "base answer"):
        table.add_column(column, overflow="fold")
    for name in tasks:
        row = load_split(name, "eval")[0]
        answers = []
        for model in (name, base_model):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": row["input"]}],
                "max_tokens": 64,
                "temperature": 0,
            }
            reply = _post_json(f"{serve_url}/v1/chat/completions", body)
            answers.append(reply["choices"][0]["message"]["content"].strip())
        table.add_row(name, row["input"], row["output"], *answers)
    console.print(table)


def bring_up(state_dir: Path) -> StackInfo:
    """The stack recorded in `state_dir` if it is running (whatever its ports), else `lorafleet up` defaults."""
    config = StackConfig(state_dir=state_dir)
    current = local_stack.status(config, with_memory=False)
    if current.running and current.info is not None:
        return current.info
    return local_stack.up(config)


def serve_config_for(info: StackInfo, source: Path, port: int | None) -> Path:
    """`source` with the stack's MLflow URL in the app's args (and another HTTP port if asked), in the state dir."""
    config = yaml.safe_load(source.read_text())
    config["applications"][0].setdefault("args", {})["mlflow_tracking_uri"] = info.mlflow_url
    if port is not None:
        config.setdefault("http_options", {})["port"] = port
    target = Path(info.state_dir) / "serve-config.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/cpu-smollm2.yaml", help="sweep config")
    parser.add_argument("--tasks", default="", help="comma-separated subset of the config's tasks")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="sweep config override, as for jobs.sweep")  # fmt: skip
    parser.add_argument("--serve-config", default="serve_app/config.yaml")
    parser.add_argument("--serve-port", type=int, default=None, help="default: the serve config's http_options")
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("LORAFLEET_STATE_DIR", ".lorafleet")))
    args = parser.parse_args(argv)

    info = bring_up(args.state_dir)
    console.print(f"[bold green]local stack[/]: Ray {info.dashboard_url}  MLflow {info.mlflow_url}")
    venv_bin = str(Path(sys.executable).parent)  # `ray` and `serve` live next to this interpreter
    env = {**os.environ, **info.client_env(), "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)

    sweep = ["python", "-m", "jobs.sweep", "--config", args.config]
    if args.tasks:
        sweep += ["--set", f"tasks=[{args.tasks}]"]
    sweep += [arg for item in args.overrides for arg in ("--set", item)]
    sweep += ["--set", f"mlflow.tracking_uri={info.mlflow_url}"]  # the job's driver does not inherit our env
    submit = ["ray", "job", "submit", "--address", info.dashboard_url, "--runtime-env", "cluster/runtime_env.yaml"]
    _run([*submit, "--", *sweep], env)

    serve_config = serve_config_for(info, REPO_ROOT / args.serve_config, args.serve_port)
    _run(["serve", "deploy", str(serve_config), "--address", info.dashboard_url], env)
    http = yaml.safe_load(serve_config.read_text()).get("http_options", {})
    serve_url = f"http://127.0.0.1:{http.get('port', 8000)}"
    wait_for_serve(serve_url)

    from jobs.config import load_config

    config = load_config(REPO_ROOT / args.config)
    tasks = args.tasks.split(",") if args.tasks else config.task_names()
    serve_args = yaml.safe_load(serve_config.read_text())["applications"][0]["args"]
    ask_each_adapter(serve_url, tasks, serve_args.get("base_model", config.base_model))
    console.print(
        f"\n[bold]Next[/]: MLflow UI {info.mlflow_url} (experiment '{config.mlflow.experiment}'), Ray dashboard "
        f"{info.dashboard_url}, endpoint {serve_url}/v1 (model=<task>).  Stop everything: lorafleet down"
    )


if __name__ == "__main__":
    try:
        main()
    except (DemoStepFailed, TimeoutError) as err:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {err}")
        raise SystemExit(1) from None
