"""`lorafleet export MODEL --format F --out DIR`: take an adapter to a laptop (registered in cluster/cli.py).

    lorafleet export sentiment --format gguf --quant q4_0 --out exports/sentiment-q4
    lorafleet export sentiment/3 --format gguf-lora --out exports/s3-lora --mlflow http://127.0.0.1:5000 --log-to-mlflow

MODEL is resolved like the serving endpoint resolves a request's `model`: the local catalog (`--catalog`) first,
then the MLflow registry (`--mlflow`; default: cluster/mlflow_uri.py's rule). Refusals exit 1 with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cluster.mlflow_uri import resolve_mlflow_uri

FORMAT_HELP = "peft | merged | gguf-lora | gguf"


def export(
    format: Annotated[str, typer.Option("--format", "-f", help=FORMAT_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="New (or empty) folder to write the export into.")],
    model: Annotated[
        str | None, typer.Argument(help="task, task@alias, task/N, or a catalog entry; omit: the base alone (gguf)")
    ] = None,
    quant: Annotated[
        str | None,
        typer.Option(
            help="gguf: f32 | f16 | q8_0 | q4_0 | q4_k_m (default f16); gguf-lora: f32 | f16 | q8_0",
        ),
    ] = None,
    base: Annotated[str, typer.Option(help="The base model the endpoint serves.")] = "smollm2-135m",
    catalog: Annotated[Path, typer.Option(help="Local adapter catalog folder.")] = Path(".lorafleet/adapters"),
    mlflow: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the running local stack's)."),
    ] = None,
    log_to_mlflow: Annotated[
        bool, typer.Option("--log-to-mlflow", help="Log the files to the version's run and tag the version.")
    ] = False,
) -> None:
    """Export an adapter: PEFT files, a merged HF folder, a llama.cpp LoRA GGUF, or a merged GGUF + Modelfile."""
    from adapters.export import ExportRefused
    from adapters.export import export as run_export

    console = Console(highlight=False, soft_wrap=True)
    try:
        result = run_export(model, format, out, quant=quant, base=base, catalog_dir=catalog,
                            mlflow_uri=resolve_mlflow_uri(mlflow),
                            log_to_mlflow=log_to_mlflow)  # fmt: skip
    except ExportRefused as err:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]refused:[/] {escape(str(err))}")
        raise typer.Exit(code=1) from None
    console.print(f"[bold green]Exported[/] {escape(result.adapter_id)} as {format} into {escape(str(out))}")
    for path in result.files:
        size = path.stat().st_size if path.is_file() else 0
        console.print(f"  {escape(str(path))}  ({size / 1e6:.1f} MB)")
    for note in result.notes:
        console.print(f"  [yellow]note:[/] {escape(note)}")
    if result.mlflow_uri:
        console.print(f"  logged to MLflow: {escape(result.mlflow_uri)}")
