"""Static checks of the Serve deployment config (serve_app/config.yaml) and the metric labels, without starting Ray.

Ray's schemas silently ignore unknown keys (a typo like `target_ongoing_request` would deploy with the default), so
besides validating with `ServeDeploySchema` every key is checked against the fields Ray defines. `args` must be a
valid `ServeAppConfig`, the import path must resolve and build, and the deployment names must be the app's.

Run: `pytest tests/test_serve_config.py -q` (a few seconds: imports Ray Serve, no processes).
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

from serve_app.app_config import ServeAppConfig
from serve_app.metrics import adapter_labels

CONFIG = Path(__file__).resolve().parents[1] / "serve_app" / "config.yaml"


def _keys(model: type[BaseModel]) -> set[str]:
    return {alias for name, f in model.model_fields.items() for alias in (name, f.alias) if alias}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def _check_known_keys(config: dict[str, Any]) -> None:
    assert set(config) <= _keys(ServeDeploySchema), set(config) - _keys(ServeDeploySchema)
    assert set(config.get("http_options", {})) <= _keys(HTTPOptionsSchema)
    for app in config["applications"]:
        assert set(app) <= _keys(ServeApplicationSchema), set(app) - _keys(ServeApplicationSchema)
        for deployment in app.get("deployments", []):
            unknown = set(deployment) - _keys(DeploymentSchema)
            assert not unknown, f"{deployment['name']}: keys Ray does not know: {unknown}"
            scaling = deployment.get("autoscaling_config") or {}
            unknown = set(scaling) - _keys(AutoscalingConfig)
            assert not unknown, f"{deployment['name']}: autoscaling keys Ray does not know: {unknown}"
            AutoscalingConfig(**scaling)  # value checks: min <= initial <= max, delays >= 0, ...
            actor = deployment.get("ray_actor_options") or {}
            assert set(actor) <= _keys(RayActorOptionsSchema), set(actor) - _keys(RayActorOptionsSchema)


def test_config_is_a_valid_serve_deploy_config(config: dict[str, Any]) -> None:
    schema = ServeDeploySchema.model_validate(config)
    _check_known_keys(config)
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app" and app.route_prefix == "/"
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8000


def test_args_are_a_valid_app_config_and_the_app_builds(config: dict[str, Any]) -> None:
    from ray.serve import Application

    app = config["applications"][0]
    args = ServeAppConfig.model_validate(app["args"])  # extra keys are refused
    assert args.base_model == "smollm2-135m" and args.engine.device == "auto"
    module, _, attr = app["import_path"].partition(":")
    build_app = getattr(importlib.import_module(module), attr)
    assert isinstance(build_app(app["args"]), Application)

    from serve_app.app import Ingress, LoraModel

    assert {d["name"] for d in app["deployments"]} == {LoraModel.name, Ingress.name}
    model = next(d for d in app["deployments"] if d["name"] == LoraModel.name)
    # the batch can fill: a replica accepts at least engine.max_running requests, and scales up before it is full
    assert model["max_ongoing_requests"] >= args.engine.max_running
    assert model["autoscaling_config"]["target_ongoing_requests"] <= args.engine.max_running
    assert (
        model["ray_actor_options"]["num_cpus"]
        + sum(d["ray_actor_options"]["num_cpus"] for d in app["deployments"] if d is not model)
        <= 2
    )  # one model replica and the ingress fit a 2-core laptop


def test_the_commented_scale_to_zero_and_gpu_variants_validate(config: dict[str, Any]) -> None:
    variant = copy.deepcopy(config)
    model = next(d for d in variant["applications"][0]["deployments"] if d["name"] == "LoraModel")
    model["autoscaling_config"]["min_replicas"] = 0
    model["autoscaling_config"].pop("initial_replicas")
    model["ray_actor_options"]["num_gpus"] = 1
    ServeDeploySchema.model_validate(variant)
    _check_known_keys(variant)


def test_unknown_keys_are_caught_here_although_ray_ignores_them(config: dict[str, Any]) -> None:
    variant = copy.deepcopy(config)
    variant["applications"][0]["deployments"][0]["autoscaling_config"]["target_ongoing_request"] = 4
    ServeDeploySchema.model_validate(variant)  # Ray accepts the typo...
    with pytest.raises(AssertionError, match="target_ongoing_request"):
        _check_known_keys(variant)  # ...this check does not


@pytest.mark.parametrize(
    ("adapter_id", "labels"),
    [
        ("base", {"adapter": "base", "version": ""}),
        ("mlflow:sentiment/3", {"adapter": "sentiment", "version": "3"}),
        ("mlflow:a.b-c_d/12", {"adapter": "a.b-c_d", "version": "12"}),
        ("local:my-adapter:1a2b3c4d", {"adapter": "my-adapter", "version": "1a2b3c4d"}),
    ],
)
def test_metric_labels_name_the_adapter_as_users_request_it(adapter_id: str, labels: dict[str, str]) -> None:
    assert adapter_labels(adapter_id) == labels


def test_the_serve_config_decides_which_adapter_sources_requests_can_reach(tmp_path: Path) -> None:
    from adapters.sources.hf_hub import HubSource
    from adapters.sources.local_catalog import LocalCatalog
    from adapters.sources.object_store import ObjectStoreSource

    plain = ServeAppConfig(mlflow_tracking_uri="").build_registry("tiny-llama")
    assert plain.sources == []  # nothing configured: no source a request could name
    wide = ServeAppConfig(mlflow_tracking_uri="", catalog_dir=str(tmp_path), hub_adapters=["my-org/*"],
                          adapter_store_prefixes=[f"file://{tmp_path}/"]).build_registry("tiny-llama")  # fmt: skip
    assert [type(s) for s in wide.sources] == [LocalCatalog, HubSource, ObjectStoreSource]
