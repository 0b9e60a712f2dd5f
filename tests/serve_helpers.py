"""Helpers for tests that deploy the Serve app onto a real Ray head and talk to it over HTTP: build app configs from
serve_app/config.yaml, deploy them with Ray's REST API (what `serve deploy` sends), read `serve status`, wait with
a timeout, and scrape Prometheus text. Used by tests/test_serve_http.py; no fixtures, nothing runs at import.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from cluster.local_stack import StackInfo
from serve_app.app_config import ServeAppConfig

CONFIG = Path(__file__).resolve().parents[1] / "serve_app" / "config.yaml"


def http_client(timeout: float = 60) -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=timeout)


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Call `check` until it returns something truthy (returned); AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def is_ok(http: httpx.Client, url: str) -> bool:
    try:
        return http.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def sse_data(lines: Iterator[str]) -> list[str]:
    """The `data:` payloads of a server-sent-event stream."""
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def app_config(name: str, route_prefix: str, args: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The application of serve_app/config.yaml renamed, with `args` merged in (validated) and the LoraModel
    deployment's autoscaling_config replaced by `model` (e.g. `{"num_replicas": 1}`)."""
    app = copy.deepcopy(yaml.safe_load(CONFIG.read_text())["applications"][0])
    app.update(name=name, route_prefix=route_prefix)
    app["args"].update(args)
    for deployment in app["deployments"]:
        if deployment["name"] == "LoraModel":
            deployment.pop("autoscaling_config", None)
            deployment.update(model)
    ServeAppConfig.model_validate(app["args"])
    return app


def serve_status(stack: StackInfo) -> dict[str, Any]:
    """`serve status` as JSON (applications -> deployments -> replicas)."""
    with http_client() as http:
        return http.get(f"{stack.dashboard_url}/api/serve/applications/").json()


def deploy(stack: StackInfo, apps: list[dict[str, Any]], wait: bool = True, timeout: float = 240) -> None:
    """PUT the whole Serve config (config.yaml's http_options on the stack's Serve port, these apps)."""
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"].update(host="127.0.0.1", port=stack.serve_http_port)
    config["applications"] = apps
    with http_client() as http:
        response = http.put(f"{stack.dashboard_url}/api/serve/applications/", json=config)
    assert response.status_code == 200, response.text
    if wait:
        wait_running(stack, [a["name"] for a in apps], timeout)


def wait_running(stack: StackInfo, names: list[str], timeout: float = 240) -> None:
    def running() -> bool:
        apps = serve_status(stack).get("applications") or {}
        failed = {n: apps[n].get("message") for n in names if (apps.get(n) or {}).get("status") == "DEPLOY_FAILED"}
        assert not failed, f"deploy failed: {failed}"
        return all((apps.get(n) or {}).get("status") == "RUNNING" for n in names)

    wait_for(f"apps {names} RUNNING", running, timeout, interval=1)


def shutdown(stack: StackInfo) -> None:
    """`serve shutdown`: delete every app and stop Serve's controller and proxy."""
    with http_client() as http:
        http.delete(f"{stack.dashboard_url}/api/serve/applications/")
        wait_for("Serve shut down", lambda: not serve_status(stack).get("applications"), 120, interval=1)
        wait_for("HTTP proxy gone", lambda: not is_ok(http, f"{stack.serve_url}/-/routes"), 60)


def replicas(stack: StackInfo, app: str, deployment: str) -> tuple[int, list[str]]:
    """(target number of replicas, the replicas' states) of one deployment."""
    details = ((serve_status(stack).get("applications") or {}).get(app) or {}).get("deployments") or {}
    found = details.get(deployment) or {}
    return found.get("target_num_replicas", 0), [r["state"] for r in found.get("replicas", [])]


def metric_totals(url: str, name: str, by: tuple[str, ...], **where: str) -> dict[tuple[str, ...], float]:
    """Scrape a Prometheus endpoint; sum the samples of `name` that match `where`, grouped by the labels `by`."""
    with http_client() as http:
        text = http.get(url).text
    totals: dict[tuple[str, ...], float] = {}
    for match in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(labels.get(k) == v for k, v in where.items()):
            key = tuple(labels.get(k, "") for k in by)
            totals[key] = totals.get(key, 0.0) + float(match.group(2))
    return totals


def replica_details(stack: StackInfo, app: str, deployment: str) -> list[dict[str, Any]]:
    """The replicas of one deployment as `serve status` reports them (replica_id, state, pid, actor_name, ...)."""
    details = ((serve_status(stack).get("applications") or {}).get(app) or {}).get("deployments") or {}
    return list((details.get(deployment) or {}).get("replicas", []))


def register_adapter(mlflow_url: str, experiment: str, name: str, folder: Path) -> str:
    """Log `folder` as a run's `adapter` artifact, register it as model `name` (base tiny-llama) with alias
    champion; the version."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=name)
    client.log_artifacts(run.info.run_id, str(folder), "adapter")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id,
                                          tags={"base_model": "tiny-llama"}).version  # fmt: skip
    client.set_registered_model_alias(name, "champion", version)
    return str(version)
