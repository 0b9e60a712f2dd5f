"""`--log-to-mlflow`: log an export's files back to the run of the adapter's model version, as the artifact
folder `exports/<format>-<quant>/`, and tag the version `export.<format>-<quant>` = that artifact URI, so the MLflow
UI shows which exports exist (Models -> version -> tags; the run's Artifacts tab holds the files).

    python -m adapters.export.mlflow_log sentiment/3 exports/sentiment-q4 --kind gguf-q4_0 --mlflow http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapters.export.prepare import ExportRefused
from adapters.sources import AdapterRef

EXPORTS_ARTIFACT = "exports"
TAG_PREFIX = "export."


def log_export(tracking_uri: str, ref: AdapterRef, folder: Path, kind: str) -> str:
    """Upload `folder` to the version's run under exports/<kind>, tag the version; the artifact URI."""
    from mlflow import MlflowClient

    if ref.source != "mlflow" or not ref.version:
        raise ExportRefused(f"--log-to-mlflow needs an adapter from the MLflow registry; {ref.id} is {ref.source}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version(ref.name, ref.version)
    if not version.run_id:
        raise ExportRefused(f"model version {ref.name}/{ref.version} has no run to log the export to")
    path = f"{EXPORTS_ARTIFACT}/{kind}"
    client.log_artifacts(version.run_id, str(folder), path)
    uri = f"{client.get_run(version.run_id).info.artifact_uri}/{path}"
    client.set_model_version_tag(ref.name, ref.version, f"{TAG_PREFIX}{kind}", uri)
    return uri


def main() -> None:
    from adapters.sources.mlflow_registry import MlflowRegistry

    parser = argparse.ArgumentParser(description="Log an export folder to an MLflow model version's run.")
    parser.add_argument("model", help="name/N or name@alias")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--kind", required=True, help="e.g. gguf-q4_0")
    parser.add_argument("--mlflow", required=True)
    args = parser.parse_args()
    ref = MlflowRegistry(args.mlflow).resolve(args.model)
    if ref is None:
        raise SystemExit(f"no model version '{args.model}' in {args.mlflow}")
    print(log_export(args.mlflow, ref, args.folder, args.kind))


if __name__ == "__main__":
    main()
