"""README.md's commands, run as written (issue 18 item 1).

The bash block under "## What you get" is parsed out of README.md and run through bash, command by command, in
order, on a fresh local stack: `lorafleet up` -> `ray job submit ... jobs.sweep` -> `serve deploy
serve_app/config.yaml` -> wait for the app -> `curl ... "model": "date_normalisation"` -> `lorafleet down`. Only
the substitutions a test needs are made, each an explicit rewrite that asserts it found exactly what it replaces
(so a changed README fails here loudly instead of testing something else):

- free loopback ports instead of 8265 / 5000 / 8000 and a temporary `--state-dir` (flags of `lorafleet up/down`);
- a shortened sweep: `--set tasks=[date_normalisation] --set training.max_steps=6 --set evaluation.max_examples=4`
  appended to the job's entrypoint;
- `serve_app/config.yaml` replaced by a copy whose `http_options.port` is the free Serve port (Serve's HTTP proxy
  takes its port from the deploy config; `lorafleet up --serve-port` only records it);
- `-w` appended to the curl, to read its HTTP status.

Nothing passes an MLflow URI: the serve config's `mlflow_tracking_uri: null` and the sweep's `tracking_uri: null`
must both resolve to the stack's MLflow by the rule in cluster/mlflow_uri.py (`lorafleet up` sets
MLFLOW_TRACKING_URI on its Ray head). Also checked: `lorafleet data check` and the output README shows for it.

    .venv/bin/python -m pytest -q tests/test_readme_commands.py     # ~3 minutes on 2 cores (one slow test)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import free_ports
from stack_processes import stack_processes, still_running

from cluster.stack_state import read_stack

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
TASK = "date_normalisation"
SHORT_SWEEP = f" --set tasks=[{TASK}] --set training.max_steps=6 --set evaluation.max_examples=4"
DOCUMENTED = {"dashboard": "http://127.0.0.1:8265", "serve": "localhost:8000", "serve_port": 8000}


# --- README parsing and rewrites ------------------------------------------------------------------------------


def bash_blocks(section: str) -> list[str]:
    """The ```bash blocks of README's `## <section>` (up to the next `## ` heading)."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start : end if end != -1 else None], flags=re.S)


def _strip_comment(line: str) -> str:
    """`line` without a trailing `# comment` (a `#` starting a word outside quotes, as bash reads it)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(block: str) -> list[str]:
    """The block's commands: comments dropped, backslash-continued lines joined into one command line each."""
    out: list[str] = []
    pending = ""
    for raw in block.splitlines():
        line = _strip_comment(raw)
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = (pending + line.strip()).strip()
        pending = ""
        if line:
            out.append(line)
    assert not pending, f"README block ends inside a continued line: {pending!r}"
    return out


def replace_once(command: str, old: str, new: str) -> str:
    """`command` with its one occurrence of `old` replaced (asserted: exactly one)."""
    assert command.count(old) == 1, f"expected exactly one {old!r} in README command: {command}"
    return command.replace(old, new)


def append_after(command: str, ending: str, extra: str) -> str:
    """`command` + `extra`, asserted to end with `ending` (so the extra flags land where the test means them)."""
    assert command.endswith(ending), f"expected README command to end with {ending!r}: {command}"
    return command + extra


def what_you_get(state: Path, ports: dict[str, int], serve_config: Path) -> list[tuple[str, str]]:
    """(README command, the command the test runs) for every command of the "What you get" block."""
    blocks = bash_blocks("What you get")
    assert len(blocks) == 1, f"expected one bash block under 'What you get', found {len(blocks)}"
    readme = commands(blocks[0])
    words = [shlex.split(c)[:3] for c in readme]
    assert words == [
        ["lorafleet", "up"],
        ["ray", "job", "submit"],
        ["serve", "deploy", "serve_app/config.yaml"],
        ["until", "curl", "-sf"],
        ["curl", "-s", f"{DOCUMENTED['serve']}/v1/chat/completions"],
        ["lorafleet", "down"],
    ], readme
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    serve = f"localhost:{ports['serve']}"
    up_flags = (f" --state-dir {shlex.quote(str(state))} --ray-port {ports['gcs']} --dashboard-port "
                f"{ports['dashboard']} --mlflow-port {ports['mlflow']} --serve-port {ports['serve']}")  # fmt: skip
    up, submit, deploy, wait, curl, down = readme
    rewritten = [
        append_after(up, "lorafleet up", up_flags),
        append_after(
            replace_once(submit, DOCUMENTED["dashboard"], dashboard),
            "--config jobs/configs/cpu-smollm2.yaml",
            SHORT_SWEEP,
        ),  # fmt: skip
        replace_once(
            replace_once(deploy, "serve_app/config.yaml", shlex.quote(str(serve_config))),
            DOCUMENTED["dashboard"],
            dashboard,
        ),  # fmt: skip
        replace_once(wait, DOCUMENTED["serve"], serve),
        replace_once(curl, DOCUMENTED["serve"], serve) + " -w '\\nHTTP %{http_code}'",
        append_after(down, "lorafleet down", f" --state-dir {shlex.quote(str(state))}"),
    ]
    return list(zip(readme, rewritten, strict=True))


def serve_config_copy(target: Path, port: int) -> Path:
    """serve_app/config.yaml with only `http_options.port` changed (asserted to be README's 8000 first)."""
    config = yaml.safe_load((REPO_ROOT / "serve_app" / "config.yaml").read_text())
    assert config["http_options"]["port"] == DOCUMENTED["serve_port"], config["http_options"]
    assert config["applications"][0]["args"]["mlflow_tracking_uri"] is None  # the rule has to find the MLflow
    config["http_options"]["port"] = port
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


# --- running ---------------------------------------------------------------------------------------------------


def user_env() -> dict[str, str]:
    """The environment of a user's shell with the venv active: its bin first on PATH, no MLflow or Ray address."""
    drop = {"RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "MLFLOW_TRACKING_URI", "LORAFLEET_STATE_DIR", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env["COLUMNS"] = "200"  # rich tables (the sweep summary, `lorafleet up`) on one line each
    return env


def bash(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, env=user_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture
def stack_dir(tmp_path: Path) -> Iterator[Path]:
    """The test's state dir; whatever the test leaves running there is shut down by PID afterwards."""
    state = tmp_path / "stack"
    yield state
    info = read_stack(state)
    if info is not None:
        env = user_env()
        subprocess.run([str(VENV_BIN / "serve"), "shutdown", "-a", info.dashboard_url, "-y"], capture_output=True,
                       timeout=120, env=env)  # fmt: skip
        subprocess.run([str(VENV_BIN / "lorafleet"), "down", "--state-dir", str(state)], capture_output=True,
                       timeout=180, env=env)  # fmt: skip
        if not Path(info.ray_temp_dir).is_relative_to(tmp_path):  # the short /tmp path used for Ray's sockets
            shutil.rmtree(info.ray_temp_dir, ignore_errors=True)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


# --- tests -----------------------------------------------------------------------------------------------------


def test_the_readme_block_is_the_one_this_test_rewrites(tmp_path: Path) -> None:
    """Without starting anything: README's block parses into the six commands and every rewrite applies."""
    ports = dict(zip(("gcs", "dashboard", "mlflow", "serve"), (1001, 1002, 1003, 1004), strict=True))
    pairs = what_you_get(tmp_path / "s", ports, serve_config_copy(tmp_path / "serve.yaml", 1004))
    ran = [ran for _, ran in pairs]
    assert "--dashboard-port 1002 --mlflow-port 1003 --serve-port 1004" in ran[0]
    assert "--address http://127.0.0.1:1002 " in ran[1] and ran[1].endswith(SHORT_SWEEP)
    assert "8265" not in " ".join(ran) and "8000" not in " ".join(ran)
    assert yaml.safe_load((tmp_path / "serve.yaml").read_text())["http_options"]["port"] == 1004
    assert commands("a \\\n  b 'x # y'  # z\n\n# only a comment\nc") == ["a b 'x # y'", "c"]


def test_data_check_prints_what_the_readme_shows() -> None:
    """`lorafleet data check jobs/configs/cpu-user-tasks.yaml` (README step 3) exits 0, and every line of the output
    README shows appears in its output, in order (README shows an excerpt; paths print as typed, relative to the working directory)."""
    text = README.read_text()
    command = "lorafleet data check jobs/configs/cpu-user-tasks.yaml"
    assert f"`{command}`" in text
    shown = re.search(r"```\n(task ticket_triage: ok\n.*?)```", text, flags=re.S)
    assert shown is not None, "README's data check output block is gone"
    result = bash(command, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    at = 0
    for want in shown.group(1).splitlines():
        assert want in lines[at:], f"README line {want!r} not in the output (from line {at}):\n{result.stdout}"
        at = lines.index(want, at) + 1


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_what_you_get_runs_as_written(stack_dir: Path, tmp_path: Path) -> None:
    gcs, dashboard, mlflow, serve = free_ports(4)
    ports = {"gcs": gcs, "dashboard": dashboard, "mlflow": mlflow, "serve": serve}
    steps = what_you_get(stack_dir, ports, serve_config_copy(tmp_path / "serve-config.yaml", serve))
    (_, up), (_, submit), (_, deploy), (_, wait), (_, curl), (_, down) = steps
    mlflow_url = f"http://127.0.0.1:{mlflow}"

    started = bash(up, timeout=300)
    out = started.stdout + started.stderr
    assert started.returncode == 0, out
    assert "Local stack is up" in out and f"http://127.0.0.1:{dashboard}" in out and mlflow_url in out, out
    assert f"http://127.0.0.1:{serve}" in out, out
    info = read_stack(stack_dir)
    assert info is not None and info.mlflow_url == mlflow_url

    job = bash(submit, timeout=1200)
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-6000:]
    assert "succeeded" in out, out[-3000:]
    title = "sweep cpu-smollm2 on smollm2-135m"  # the summary table's title, then its rows
    assert title in out, out[-3000:]
    summary = out[out.index(title) :]
    assert TASK in summary, out[-3000:]
    assert f"registered {TASK} version 1" in out, out[-3000:]
    assert f"MLflow: {mlflow_url}/#/experiments/" in out, out[-3000:]  # the job found the stack's MLflow itself

    # The CLI side of the rule: next to the stack (its state dir), with no MLFLOW_TRACKING_URI set.
    resolved = subprocess.run([sys.executable, "-m", "cluster.mlflow_uri"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=60, env={**user_env(), "LORAFLEET_STATE_DIR": str(stack_dir)})  # fmt: skip
    assert resolved.stdout.strip() == mlflow_url, resolved.stdout + resolved.stderr

    deployed = bash(deploy, timeout=180)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    try:
        ready = bash(wait, timeout=600)
    except subprocess.TimeoutExpired:
        st = bash(f"serve status -a http://127.0.0.1:{dashboard}", timeout=60)
        pytest.fail(f"the app did not answer /health within 600 s; serve status:\n{st.stdout}{st.stderr}")
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert get_json(f"http://127.0.0.1:{serve}/health")["status"] == "ok"

    answer = bash(curl, timeout=600)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    body, _, status = answer.stdout.rpartition("\nHTTP ")
    assert status.strip() == "200", answer.stdout
    reply = json.loads(body)
    assert reply["object"] == "chat.completion" and reply["model"] == TASK, reply
    assert reply["choices"][0]["message"]["content"].strip(), reply
    models = [m["id"] for m in get_json(f"http://127.0.0.1:{serve}/v1/models")["data"]]
    assert TASK in models and "smollm2-135m" in models, models

    status_cmd = bash(f"lorafleet status --state-dir {shlex.quote(str(stack_dir))}", timeout=120)
    assert status_cmd.returncode == 0 and status_cmd.stdout.count("running") >= 2, status_cmd.stdout + status_cmd.stderr

    procs = stack_processes(info)
    assert len(procs) > 5, procs  # head, raylet, GCS, dashboard, MLflow, Serve's controller/proxy/replicas, ...
    stopped = bash(down, timeout=300)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "Stopped ray" in stopped.stdout and "Stopped mlflow" in stopped.stdout, stopped.stdout
    time.sleep(1)
    assert still_running(procs) == [], f"stack processes left after `lorafleet down`: {still_running(procs)}"
    assert read_stack(stack_dir) is None
