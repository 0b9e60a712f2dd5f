"""MLflow with a PostgreSQL backend and an S3-compatible artifact store, offline (issue 20 item 6): the cloud
launchers' MLflow start command (cluster/aws-a100.yaml, cluster/gcp-a100.yaml) takes both stores from
cluster/lorafleet.env and falls back to sqlite / the head's disk with a WARNING only when they are unset; then a
real PostgreSQL (tests/pg_server.py), a real moto S3 server (tests/s3_server.py) and a real `mlflow server` started
with exactly the arguments that command renders hold a sweep's kind of data: a run with metrics, an adapter
artifact and a registered model version with the `champion` alias, all read back (artifact bytes equal), the rows
in PostgreSQL and the artifact in the bucket. The client holds no S3 keys: the server proxies artifacts.

    .venv/bin/python -m pytest -q tests/test_mlflow_postgres_s3.py      (~15 s on 2 cores)
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from pg_server import postgres, why_no_postgres
from s3_server import moto_s3, s3_env

from cluster.mlflow_server import mlflow_executable, server_env
from cluster.processes import LOOPBACK, find_process, http_ok, spawn_in_new_session, stop_tree

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("aws-a100.yaml", "gcp-a100.yaml")
FAKE_MLFLOW = '#!/bin/sh\nenv | grep "^AWS_" > "$HOME/mlflow/env"\nprintf "%s\\n" "$@" > "$HOME/mlflow/argv"\n'


def mlflow_start_command(launcher: str) -> str:
    """The head start command of `launcher` that starts the MLflow server."""
    config = yaml.safe_load((ROOT / "cluster" / launcher).read_text())
    (command,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    return command


def render(launcher: str, home: Path, env_file: dict[str, str]) -> tuple[list[str], dict[str, str], str]:
    """Run the launcher's MLflow start command with bash, HOME=`home` holding a lorafleet.env of `env_file`, and a
    stand-in `mlflow` on PATH that records its arguments and AWS_* environment. Returns (the `mlflow` arguments,
    that environment, the command's stderr); no arguments when it started no server."""
    (home / "bin").mkdir(parents=True)
    fake = home / "bin" / "mlflow"
    fake.write_text(FAKE_MLFLOW)
    fake.chmod(0o755)
    (home / "lorafleet.env").write_text("".join(f"{k}='{v}'\n" for k, v in env_file.items()))
    env = {"HOME": str(home), "PATH": f"{home / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", mlflow_start_command(launcher)], env=env, capture_output=True, text=True,
                          timeout=30, check=True)  # fmt: skip
    argv_file = home / "mlflow" / "argv"
    if not argv_file.parent.exists():  # the command started nothing
        return [], {}, done.stderr
    deadline = time.monotonic() + 10
    while not (argv_file.exists() and argv_file.read_text().endswith("\n")) and time.monotonic() < deadline:
        time.sleep(0.05)
    environment = dict(line.split("=", 1) for line in (home / "mlflow" / "env").read_text().splitlines())
    return argv_file.read_text().splitlines(), environment, done.stderr


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_takes_postgres_and_s3_from_the_env_file(launcher: str, tmp_path: Path) -> None:
    stores = {"LORAFLEET_MLFLOW_BACKEND_URI": "postgresql://mlflow:pw@db.internal:5432/mlflow",
              "LORAFLEET_MLFLOW_ARTIFACTS": "s3://my-bucket/mlflow", "AWS_ENDPOINT_URL": "http://minio:9000"}  # fmt: skip
    argv, env, stderr = render(launcher, tmp_path / "set", stores)
    assert argv[0] == "server" and option(argv, "--host") == "0.0.0.0" and option(argv, "--port") == "5000"
    assert option(argv, "--backend-store-uri") == stores["LORAFLEET_MLFLOW_BACKEND_URI"]
    assert option(argv, "--artifacts-destination") == stores["LORAFLEET_MLFLOW_ARTIFACTS"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"  # an S3-compatible endpoint reaches the server
    assert "WARNING" not in stderr
    setup = " ".join(yaml.safe_load((ROOT / "cluster" / launcher).read_text())["head_setup_commands"])
    assert '"psycopg[binary]"' in setup and "boto3" in setup  # SQLAlchemy 2.1's postgresql:// driver; s3://

    argv, _, stderr = render(launcher, tmp_path / "unset", {"LORAFLEET_API_KEY": ""})
    home = tmp_path / "unset"
    assert option(argv, "--backend-store-uri") == f"sqlite:///{home}/mlflow/mlflow.db"
    assert option(argv, "--artifacts-destination") == f"{home}/mlflow/artifacts"
    assert "WARNING: LORAFLEET_MLFLOW_BACKEND_URI is unset" in stderr
    assert "WARNING: LORAFLEET_MLFLOW_ARTIFACTS is unset" in stderr

    external = {"LORAFLEET_MLFLOW_URI": "http://mlflow.internal:5000", **stores}
    assert render(launcher, tmp_path / "external", external)[0] == []  # an external server: none started here


@pytest.mark.slow
def test_mlflow_server_on_postgres_and_s3_keeps_runs_artifacts_and_the_registry(tmp_path: Path) -> None:
    reason = why_no_postgres()
    if reason is not None:
        pytest.skip(reason)
    import boto3
    import psycopg
    from mlflow.tracking import MlflowClient

    with moto_s3(tmp_path) as endpoint, postgres("mlflow") as database:
        aws = s3_env(endpoint)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="bucket")  # fmt: skip
        env_file = {"LORAFLEET_MLFLOW_BACKEND_URI": database, "LORAFLEET_MLFLOW_ARTIFACTS": "s3://bucket/mlflow",
                    **aws}  # fmt: skip
        argv, server_aws, _ = render("aws-a100.yaml", tmp_path / "head", env_file)
        port = _free_port()
        argv[argv.index("--host") + 1], argv[argv.index("--port") + 1] = LOOPBACK, str(port)
        argv[argv.index("--workers") + 1] = "1"
        record = spawn_in_new_session([mlflow_executable(), *argv], env={**server_env(), **server_aws},
                                      log_path=tmp_path / "mlflow.log", cwd=tmp_path)  # fmt: skip
        try:
            url = f"http://{LOOPBACK}:{port}"
            deadline = time.monotonic() + 90
            while not http_ok(f"{url}/health"):
                alive = find_process(record) is not None and time.monotonic() < deadline
                assert alive, (tmp_path / "mlflow.log").read_text()[-3000:]
                time.sleep(0.5)
            _log_and_read_back(MlflowClient(tracking_uri=url), tmp_path, endpoint, aws, database, psycopg, boto3)
        finally:
            stop_tree(record, graceful_timeout=10.0)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _log_and_read_back(client, tmp_path: Path, endpoint: str, aws: dict[str, str], database: str, psycopg,
                       boto3) -> None:  # fmt: skip
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    payload = os.urandom(50_000)
    (adapter / "adapter_model.safetensors").write_bytes(payload)
    experiment = client.create_experiment("pg-s3")
    run = client.create_run(experiment, run_name="sentiment")
    run_id = run.info.run_id
    for step, loss in enumerate((2.0, 1.5, 1.25)):
        client.log_metric(run_id, "loss", loss, step=step)
    client.log_metric(run_id, "adapter_score", 0.75)
    client.log_artifacts(run_id, str(adapter), "adapter")
    client.set_terminated(run_id)
    client.create_registered_model("sentiment")
    version = client.create_model_version("sentiment", source=f"{run.info.artifact_uri}/adapter", run_id=run_id)
    client.set_registered_model_alias("sentiment", "champion", version.version)

    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [2.0, 1.5, 1.25]
    assert client.get_run(run_id).data.metrics["adapter_score"] == 0.75
    champion = client.get_model_version_by_alias("sentiment", "champion")
    assert champion.version == version.version and champion.run_id == run_id
    back = Path(client.download_artifacts(run_id, "adapter", str(tmp_path / "back")))
    assert (back / "adapter_model.safetensors").read_bytes() == payload

    with psycopg.connect(database) as connection:  # the rows live in PostgreSQL
        loss_rows = connection.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss'", (run_id,))
        assert loss_rows.fetchone()[0] == 3
        versions = connection.execute("SELECT name, version FROM model_versions").fetchall()
        assert versions == [("sentiment", int(version.version))]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="bucket", Prefix="mlflow/")["Contents"]]
    (key,) = [k for k in keys if k.endswith(f"{run_id}/artifacts/adapter/adapter_model.safetensors")]
    assert s3.get_object(Bucket="bucket", Key=key)["Body"].read() == payload  # the artifact lives in the bucket
