"""The `lorafleet` command line (console script `lorafleet = cluster.cli:app`; also `python -m cluster.cli`).

    lorafleet up [--state-dir .lorafleet] [--num-cpus N] [--ray-port 6379] [--dashboard-port 8265]
                 [--mlflow-port 5000] [--serve-port 8000]
    lorafleet status [--state-dir ...] [--json]
    lorafleet down [--state-dir ...]
    lorafleet add-node [--state-dir ...] [--num-cpus N] [--resources JSON] [--name NAME]   (cluster/worker_node.py)
    lorafleet data check CONFIG [--task T]      (jobs/task_data/check.py)

Thin on purpose: each command parses its options and calls `cluster.local_stack`. Add new commands as one
function each with `@app.command()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cluster import cli_export, local_stack
from cluster.local_stack import StackConfig, StackError, StackInfo

app = typer.Typer(
    name="lorafleet",
    help="Fine-tune LoRA adapters on Ray, track them in MLflow, serve them with Ray Serve.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("export")(cli_export.export)  # lorafleet export MODEL --format F --out DIR (cluster/cli_export.py)

_DEFAULT_STATE_DIR = Path(".lorafleet")
StateDirOption = Annotated[
    Path,
    typer.Option("--state-dir", envvar="LORAFLEET_STATE_DIR", help="Folder holding stack.json, logs and data."),
]


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)  # commands and URLs stay on one line for copy-paste


def _fail(message: str, log_path: Path | None = None) -> NoReturn:
    suffix = f" (log: {log_path})" if log_path else ""
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(message + suffix)}")
    raise typer.Exit(code=1)


def _config(**fields: object) -> StackConfig:
    try:
        return StackConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()))


def _state_flag(state_dir: Path) -> str:
    return "" if state_dir == _DEFAULT_STATE_DIR else escape(f" --state-dir {state_dir}")


def _print_stack(info: StackInfo, state_dir: Path) -> None:
    console = _console()
    if info.already_running:
        console.print("[bold green]Local stack already running[/]")
    else:
        console.print(f"[bold green]Local stack is up[/] (started: {', '.join(info.started)})")
    grid = Table.grid(padding=(0, 2))
    grid.add_row("  Ray address", f"{info.ray_address}  (pid {info.ray.pid}, {info.num_cpus} CPUs)")
    grid.add_row("  Ray dashboard", info.dashboard_url)
    grid.add_row("  MLflow UI", f"{info.mlflow_url}  (pid {info.mlflow.pid})")
    grid.add_row("  Serve HTTP", f"{info.serve_url}  (for Ray Serve; not started by `up`)")
    grid.add_row("  State dir", escape(info.state_dir))
    grid.add_row("  Ray log", escape(str(info.ray_log)))
    grid.add_row("  MLflow log", escape(str(info.mlflow_log)))
    console.print(grid)
    console.print()
    console.print(f"  Submit a job:  [bold]{info.job_submit_command()}[/]")
    console.print(f"  Track runs:    [bold]export MLFLOW_TRACKING_URI={info.mlflow_url}[/]")
    console.print(f"  Stop:          [bold]lorafleet down{_state_flag(state_dir)}[/]")


@app.command()
def up(
    state_dir: StateDirOption = _DEFAULT_STATE_DIR,
    num_cpus: Annotated[int | None, typer.Option(help="Logical CPUs Ray offers (default: all cores).")] = None,
    ray_port: Annotated[int, typer.Option(help="Ray GCS port (ray address 127.0.0.1:PORT).")] = 6379,
    dashboard_port: Annotated[int, typer.Option(help="Ray dashboard / job API port.")] = 8265,
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server port.")] = 5000,
    serve_port: Annotated[int, typer.Option(help="Port recorded for Ray Serve's HTTP proxy.")] = 8000,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for both servers to answer.")] = 180.0,
) -> None:
    """Start a local Ray head + MLflow server on 127.0.0.1 (or report the ones already running)."""
    config = _config(
        state_dir=state_dir,
        num_cpus=num_cpus,
        ray_gcs_port=ray_port,
        dashboard_port=dashboard_port,
        mlflow_port=mlflow_port,
        serve_http_port=serve_port,
        startup_timeout_s=timeout,
    )
    try:
        info = local_stack.up(config)
    except StackError as exc:
        _fail(str(exc), exc.log_path)
    _print_stack(info, state_dir)
    if info.already_running:
        for note in local_stack.requested_but_different(config, info):
            _console().print(f"  [yellow]note:[/] {note} (takes effect after `lorafleet down`)")


@app.command()
def down(state_dir: StateDirOption = _DEFAULT_STATE_DIR) -> None:
    """Stop the local stack recorded in STATE_DIR/stack.json, by PID."""
    try:
        report = local_stack.down(_config(state_dir=state_dir))
    except StackError as exc:
        _fail(str(exc), exc.log_path)
    console = _console()
    if not report.was_running:
        extra = " (removed a stale stack.json)" if report.had_record else ""
        console.print(f"Nothing running in {escape(str(state_dir))}{extra}")
        return
    for name, outcome in report.stopped.items():
        if outcome.was_running:
            killed = f", {len(outcome.killed_pids)} needed SIGKILL" if outcome.killed_pids else ""
            console.print(f"Stopped {name}: {len(outcome.stopped_pids)} processes in {outcome.seconds:.1f}s{killed}")
    if report.leftover_pids:
        _fail(f"processes still alive after SIGKILL: {report.leftover_pids}")


@app.command("add-node")
def add_node(
    state_dir: StateDirOption = _DEFAULT_STATE_DIR,
    num_cpus: Annotated[int, typer.Option(min=1, help="Logical CPUs the new node offers.")] = 1,
    resources: Annotated[str, typer.Option(help="Custom resources as JSON, e.g. '{\"node_b\": 1}'.")] = "{}",
    name: Annotated[str | None, typer.Option(help="Node name (default w1, w2, ...).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the node to join.")] = 180.0,
) -> None:
    """Add a worker raylet on 127.0.0.1 to the running local stack; `lorafleet down` stops it too."""
    from cluster import worker_node

    try:
        st = local_stack.status(_config(state_dir=state_dir), with_memory=False)
        if st.info is None or not st.running:
            _fail(f"no running stack in {state_dir}; start one with `lorafleet up{_state_flag(state_dir)}`")
        node = worker_node.add_node(st.info, num_cpus=num_cpus, resources=worker_node.parse_resources(resources),
                                    name=name, timeout=timeout)  # fmt: skip
    except StackError as exc:
        _fail(str(exc), exc.log_path)
    _console().print(f"[bold green]Node {node.name} joined[/] {st.info.ray_address}: node id {node.node_id}, "
                     f"{node.num_cpus} CPUs, resources {node.resources} (pid {node.process.pid})")  # fmt: skip


@app.command()
def status(
    state_dir: StateDirOption = _DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print stack.json plus health as JSON.")] = False,
) -> None:
    """Show the local stack; exit code 0 only if Ray and MLflow both answer."""
    try:
        st = local_stack.status(_config(state_dir=state_dir))
    except StackError as exc:
        _fail(str(exc), exc.log_path)
    if as_json:
        typer.echo(st.model_dump_json(indent=2))
    elif st.info is None:
        _console().print(
            f"Nothing running in {escape(str(state_dir))} (start it with `lorafleet up{_state_flag(state_dir)}`)"
        )
    else:
        table = Table(title=escape(f"lorafleet stack in {st.info.state_dir}"))
        for column in ("component", "pid", "state", "url", "memory (PSS)", "log"):
            table.add_column(column)
        for c in st.components:
            state = "[green]running[/]" if c.healthy else ("[yellow]not answering[/]" if c.alive else "[red]dead[/]")
            memory = f"{c.memory_mb:.0f} MiB" if c.memory_mb is not None else "-"
            table.add_row(c.name, str(c.pid), state, c.url, memory, escape(c.log_path))
        _console().print(table)
        _console().print(f"Ray address {st.info.ray_address}; submit with `{st.info.job_submit_command()}`")
    if not st.running:
        raise typer.Exit(code=1)


data_app = typer.Typer(help="Look at tasks' data before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    config: Annotated[Path, typer.Argument(help="The sweep config (YAML).")],
    task: Annotated[str | None, typer.Option(help="Check only this task.")] = None,
) -> None:
    """Rows, format, token lengths, labels, duplicates and one rendered example per task; exit 1 on any error."""
    from jobs.task_data.check import run_check

    raise typer.Exit(code=run_check(config, task))


if __name__ == "__main__":
    app()
