"""`lorafleet export --log-to-mlflow` against a real `mlflow server` (started here on a free loopback port, stopped
by PID): MODEL resolved through the registry (`name/N`, `name@alias`), the export's files logged to the version's
run under exports/<format>-<quant>/, and the version tagged with that artifact URI.

    .venv/bin/python -m pytest -q tests/test_export_mlflow.py
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters.export import ExportRefused, export
from adapters.random_adapter import write_random_adapter
from cluster import mlflow_server
from cluster.processes import stop_tree

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_url(tmp_path: Path, port_picker: Callable[[int], list[int]]) -> Iterator[str]:
    port = port_picker(1)[0]
    state = tmp_path / "mlflow-state"
    record = mlflow_server.start_server(state, port, state / "server.log")
    try:
        deadline = time.monotonic() + 120
        while not mlflow_server.server_ready(port):
            assert time.monotonic() < deadline, (state / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield mlflow_server.mlflow_url(port)
    finally:
        stop_tree(record)


def test_export_logs_to_the_versions_run_and_tags_it(mlflow_url: str, tmp_path: Path, tiny_shapes) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    adapter = write_random_adapter(tmp_path / "adapter", tiny_shapes, rank=8, seed=3)
    run_id = client.create_run(client.create_experiment("export-test")).info.run_id
    client.log_artifacts(run_id, str(adapter), "adapter")
    client.create_registered_model("sentiment")
    source = f"{client.get_run(run_id).info.artifact_uri}/adapter"
    version = client.create_model_version("sentiment", source, run_id=run_id, tags={"base_model": "tiny-llama"})
    client.set_registered_model_alias("sentiment", "champion", version.version)

    result = export("sentiment@champion", "gguf-lora", tmp_path / "out", quant="f32", base="tiny-llama",
                    mlflow_uri=mlflow_url, log_to_mlflow=True)  # fmt: skip
    assert result.adapter_id == f"mlflow:sentiment/{version.version}"
    logged = [a.path for a in client.list_artifacts(run_id, "exports/gguf-lora-f32")]
    assert logged == [f"exports/gguf-lora-f32/sentiment-v{version.version}-lora-f32.gguf"]
    tags = client.get_model_version("sentiment", version.version).tags
    assert tags["export.gguf-lora-f32"] == result.mlflow_uri and result.mlflow_uri.endswith("exports/gguf-lora-f32")
    downloaded = Path(client.download_artifacts(run_id, logged[0], str(tmp_path / "dl")))
    assert downloaded.read_bytes() == result.files[0].read_bytes()

    with pytest.raises(ExportRefused, match="does not exist"):
        export("sentiment/9", "peft", tmp_path / "out2", base="tiny-llama", mlflow_uri=mlflow_url)
    assert not (tmp_path / "out2").exists()
