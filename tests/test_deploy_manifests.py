"""Offline checks of the deployment files: Ray cluster-launcher configs (cluster/*-a100.yaml) and the Kustomize
layout of KubeRay manifests (k8s/base, k8s/overlays/*), without a cloud account or a cluster (kubectl only for its
built-in kustomize, where installed).

- Launcher configs validate against Ray's own schema (ray/autoscaler/ray-schema.json) and Ray's `prepare_config`
  + `validate_config` (what `ray up` runs first); their shell commands parse with `bash -n`.
- Each kustomization is built by the real kustomize (`kustomize build` / `kubectl kustomize`) where installed, else
  by tests/kustomize_lite.py: `test_the_real_kustomize_built_the_overlays_and_the_fallback_agrees` passes only
  when the real one ran (and the fallback builds the same objects), and is skipped naming the fallback otherwise.
  Every RayCluster / RayJob / RayService validates against the v1 `openAPIV3Schema` of the KubeRay CRDs copied
  into tests/data/kuberay-crds/, made strict: an object schema with `properties` accepts no other keys (the API
  server would prune them silently).
- Core objects (Deployment, StatefulSet, Service, PVC, ConfigMap) get hand-written structural checks; every
  ConfigMap / PVC / Secret reference resolves; no credential is inline anywhere.
- The generated fields (serveConfigV2, runtimeEnvYAML) match their sources (cluster/render_k8s.py).

Run: `pytest tests/test_deploy_manifests.py -q` (a few seconds).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import ray
import yaml
from kustomize_lite import build, build_lite, builder, load_docs, real_kustomize

from cluster import render_k8s

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "tests" / "data" / "kuberay-crds"
SHARED_CRDS = ROOT.parent / "shared" / "kuberay-crds"
CLUSTER = ROOT / "cluster"
RUNTIME_ENV = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
LAUNCHER_CONFIGS = sorted(p.name for p in CLUSTER.glob("*.yaml") if "provider" in yaml.safe_load(p.read_text()))
BUILDS = ("base", "overlays/local", "overlays/a100")
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
SECRET_NAME = "lorafleet-secrets"
CREDENTIAL = re.compile(r"(^|[_-])(PASSWORD|PASSWD|SECRET|KEY|TOKEN|CREDENTIALS?)([_-]|$)", re.IGNORECASE)
SECRET_EXAMPLE = load_docs(ROOT / "k8s" / "base" / "secret.example.yaml")[0]


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside `node`, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside any object (Deployment, StatefulSet, Ray head/worker groups, RayJob submitter)."""
    return [node for node in _walk(obj) if isinstance(node.get("containers"), list)]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for spec in pod_specs(obj) for c in spec["containers"] + spec.get("initContainers", [])]


def the(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ray_cluster_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [the(objects, "RayCluster")["spec"], the(objects, "RayService")["spec"]["rayClusterConfig"]]


def _closed(schema: Any) -> Any:
    """An OpenAPI v3 schema as strict JSON Schema: objects with `properties` refuse other keys (unless marked
    x-kubernetes-preserve-unknown-fields); int-or-string fields accept exactly an integer or a string."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _closed(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_closed(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict[str, Any]]]:
    return {name: build(ROOT / "k8s" / name) for name in BUILDS}


def test_the_real_kustomize_built_the_overlays_and_the_fallback_agrees(builds: dict) -> None:
    """Skipped (saying so) where only the fallback ran; else the real build, and the fallback builds the same."""
    if real_kustomize() is None:
        pytest.skip(f"built by {builder()}")
    print(f"\nbuilt by {builder()}")
    for name in BUILDS:
        key = lambda obj: (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])  # noqa: E731
        real = {key(obj): obj for obj in builds[name]}
        lite = {key(obj): obj for obj in build_lite(ROOT / "k8s" / name)}
        assert real.keys() == lite.keys(), (name, sorted(set(real) ^ set(lite)))
        differ = [k for k in real if real[k] != lite[k]]
        assert differ == [], f"{name}: tests/kustomize_lite.py builds these differently: {differ}"


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    validators = {}
    for path in sorted(CRD_DIR.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(_closed(v1["schema"]["openAPIV3Schema"]))
    assert set(validators) == set(RAY_KINDS)
    return validators


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_rays_schema(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(config)
    validate_config(prepare_config(copy.deepcopy(config)))  # `ray up`'s checks before it contacts the cloud
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}, "the head must not take trainers"
    (gpu,) = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu["min_workers"] == 0 and 0 < gpu["max_workers"] <= config["max_workers"]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_installs_lorafleet_and_starts_mlflow(name: str) -> None:
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert set(LAUNCHER_CONFIGS) >= {"aws-a100.yaml", "gcp-a100.yaml"}
    setup = config["setup_commands"]
    assert "torch" in setup[0] and "download.pytorch.org/whl/cu" in setup[0], "the CUDA torch build comes first"
    assert "-c constraints.txt" in setup[1] and '-e ".[deepspeed]"' in setup[1]
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")
    assert config["file_mounts"]["~/lorafleet"] == "."
    assert config["rsync_exclude"] == RUNTIME_ENV["excludes"], "keep in step with cluster/runtime_env.yaml"
    head = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head and "LORAFLEET_MLFLOW_URI" in head and "MLFLOW_TRACKING_URI" in head
    assert "MLFLOW_TRACKING_URI" in " ".join(config["worker_start_ray_commands"])
    example = (CLUSTER / "lorafleet.env.example").read_text()
    used = set(re.findall(r"LORAFLEET_[A-Z_]+", yaml.safe_dump(config)))
    assert used <= set(re.findall(r"^(LORAFLEET_[A-Z_]+)=", example, re.MULTILINE)), "document every variable"
    commands = [c for key, value in config.items() if key.endswith("_commands") for c in value]
    for command in commands:  # Ray runs each one with bash; a folded-YAML slip shows up as a syntax error
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


@pytest.mark.parametrize("name", BUILDS)
def test_kuberay_objects_validate_against_crds(name: str, builds: dict, crd_validators: dict) -> None:
    objects = builds[name]
    for kind in RAY_KINDS:
        obj = the(objects, kind)
        assert obj["apiVersion"] == "ray.io/v1"
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validators[kind].iter_errors(obj)]
        assert not errors, f"{name} {kind} {obj['metadata']['name']}:\n" + "\n".join(errors[:10])


def test_strict_crd_validation_catches_typos(builds: dict, crd_validators: dict) -> None:
    cluster = copy.deepcopy(the(builds["base"], "RayCluster"))
    assert crd_validators["RayCluster"].is_valid(cluster)
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = cluster["spec"]["headGroupSpec"].pop("rayStartParams")
    assert not crd_validators["RayCluster"].is_valid(cluster), "an unknown key must fail, not be pruned"
    cluster = copy.deepcopy(the(builds["base"], "RayCluster"))
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "16GB"
    assert not crd_validators["RayCluster"].is_valid(cluster), "a malformed quantity must fail"


def test_images_match_the_dockerfile(builds: dict) -> None:
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    assert (
        f"rayproject/ray:{ray.__version__}-py311" in dockerfile and '-c constraints.txt -e ".[deepspeed]"' in dockerfile
    )
    images = {c["image"].rpartition(":")[0] for name in BUILDS for c in containers(builds[name])}
    assert {i for i in images if "lorafleet" in i} == {"ghcr.io/lorafleet/lorafleet", "ghcr.io/lorafleet/mlflow"}


def test_crd_copies_match_shared() -> None:
    if not SHARED_CRDS.is_dir():
        pytest.skip("../shared/kuberay-crds is not there (CI clone): nothing to compare with")
    for path in SHARED_CRDS.glob("*.yaml"):
        assert (CRD_DIR / path.name).read_bytes() == path.read_bytes(), f"{path.name}: copy differs from ../shared"


@pytest.mark.parametrize("name", BUILDS)
def test_core_objects_are_well_formed(name: str, builds: dict) -> None:
    objects = builds[name]
    templates = {}
    for obj in objects:
        meta = obj["metadata"]
        assert obj["apiVersion"] and obj["kind"] and meta["name"], obj
        assert obj["kind"] == "Namespace" or meta["namespace"] == "lorafleet"
        for container in containers(obj):
            assert container["name"] and re.fullmatch(r"[\w./-]+:[\w.-]+", container["image"]), container
            assert not container["image"].endswith(":latest")
            port_names = {p["name"] for p in container.get("ports", []) if "name" in p}
            assert all(isinstance(p["containerPort"], int) for p in container.get("ports", []))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or isinstance(port, int) or port in port_names, f"{probe} port {port}"
        if obj["kind"] in ("Deployment", "StatefulSet"):
            selector = obj["spec"]["selector"]["matchLabels"]
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert selector and selector.items() <= labels.items(), f"{meta['name']}: selector/template labels"
            templates[meta["name"]] = obj["spec"]["template"]
        if obj["kind"] == "StatefulSet":
            assert the(objects, "Service", obj["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
        if obj["kind"] == "PersistentVolumeClaim":
            assert obj["spec"]["accessModes"] and obj["spec"]["resources"]["requests"]["storage"]
        if obj["kind"] == "ConfigMap":
            assert all(isinstance(v, str) for v in obj["data"].values())
    for service in (o for o in objects if o["kind"] == "Service"):
        wanted = service["spec"]["selector"].items()
        selected = [t for t in templates.values() if wanted <= t["metadata"]["labels"].items()]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} workloads"
        names = {p.get("name") for c in selected[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert isinstance(port["port"], int) and port["targetPort"] in names | {port["port"]}


@pytest.mark.parametrize("name", BUILDS)
def test_references_resolve(name: str, builds: dict) -> None:
    objects = builds[name]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    secret_keys = set(SECRET_EXAMPLE["stringData"])
    for node in _walk(objects):
        if "configMapRef" in node:
            assert ("ConfigMap", node["configMapRef"]["name"]) in names
        if "persistentVolumeClaim" in node:
            assert ("PersistentVolumeClaim", node["persistentVolumeClaim"]["claimName"]) in names
        if "secretKeyRef" in node:
            ref = node["secretKeyRef"]
            assert ref["name"] == SECRET_NAME and ref["key"] in secret_keys, f"{ref}: see secret.example.yaml"
    for obj in objects:  # every Ray pod mounts the shared volume (checkpoints, HF cache)
        if obj["kind"] in ("RayCluster", "RayService"):
            for spec in pod_specs(obj):
                claims = {v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
                assert "lorafleet-shared" in claims
                assert {"name": "shared", "mountPath": "/mnt/shared"} in spec["containers"][0]["volumeMounts"]


def test_secret_example_documents_every_key_and_is_not_applied() -> None:
    assert SECRET_EXAMPLE["kind"] == "Secret" and SECRET_EXAMPLE["metadata"]["name"] == SECRET_NAME
    assert all(v == "" or v.startswith("<") for v in SECRET_EXAMPLE["stringData"].values()), "placeholders only"
    for kustomization in (ROOT / "k8s").rglob("kustomization.yaml"):
        assert "secret.example.yaml" not in yaml.safe_load(kustomization.read_text()).get("resources", [])
    assert CREDENTIAL.search("AWS_SECRET_ACCESS_KEY") and CREDENTIAL.search("HF_TOKEN")
    assert not CREDENTIAL.search("TOKENIZERS_PARALLELISM")


@pytest.mark.parametrize("name", BUILDS)
def test_no_inline_credentials(name: str, builds: dict) -> None:
    objects = builds[name]
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created out of band (secret.example.yaml)"
    for node in _walk(objects):
        if "name" in node and ("value" in node or "valueFrom" in node) and CREDENTIAL.search(node["name"]):
            ok = "value" not in node and "secretKeyRef" in node["valueFrom"]
            assert ok, f"env {node['name']}: use a secretKeyRef"
    for cm in (o for o in objects if o["kind"] == "ConfigMap"):
        assert not [k for k in cm["data"] if CREDENTIAL.search(k)], "credentials do not belong in a ConfigMap"
    for obj in objects:  # the YAML strings embedded in Ray objects carry no credentials either
        for key in ("serveConfigV2", "runtimeEnvYAML"):
            if key in obj.get("spec", {}):
                env_vars = [n.get("env_vars", {}) for n in _walk(yaml.safe_load(obj["spec"][key]))]
                assert not [k for env in env_vars for k in env if CREDENTIAL.search(k)], f"{key} holds a credential"
    text = yaml.safe_dump(objects)
    assert not re.findall(r"://[^/\s:@]+:[^/\s@$]+@", text), "a URL with a literal password"


def test_serve_api_key_is_required_by_default(builds: dict) -> None:
    for name in BUILDS:
        service = the(builds[name], "RayService")
        for container in containers(service):
            (env,) = [e for e in container["env"] if e["name"] == "LORAFLEET_API_KEY"]
            assert env["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": "api-key"}, "not optional"
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert app["args"]["api_key_env"] == "LORAFLEET_API_KEY"


def test_render_check_passes_on_the_committed_manifests() -> None:
    assert render_k8s.main(["--check"]) == 0, "run: python -m cluster.render_k8s"


@pytest.mark.parametrize("target", [t for t in render_k8s.TARGETS if t.key == "serveConfigV2"], ids=lambda t: t.name)
def test_serve_config_v2_matches_serve_app_config(target: render_k8s.Target) -> None:
    source = yaml.safe_load((ROOT / "serve_app" / "config.yaml").read_text())
    embedded = render_k8s.read_block((ROOT / target.manifest).read_text(), target.key)
    for path, value in target.overrides.items():  # the declared overrides, and nothing else, differ
        assert render_k8s.get_path(embedded, path) == value
        try:
            render_k8s.set_path(embedded, path, render_k8s.get_path(source, path))
        except render_k8s.RenderError:  # a key the source does not have: only ray_actor_options may gain one
            assert path.split("/")[-2] == "ray_actor_options", path
            del render_k8s.get_path(embedded, path.rpartition("/")[0])[path.split("/")[-1]]
    assert embedded == source, f"{target.manifest}: serveConfigV2 drifted from serve_app/config.yaml"


def test_rendered_serve_configs_are_valid_for_ray_serve() -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import RayActorOptionsSchema, ServeDeploySchema

    for target in (t for t in render_k8s.TARGETS if t.key == "serveConfigV2"):
        config = render_k8s.render_document(target)
        ServeDeploySchema.model_validate(config)
        assert config["http_options"]["host"] == "0.0.0.0", "the serve Service cannot reach a proxy on 127.0.0.1"
        for deployment in config["applications"][0]["deployments"]:
            AutoscalingConfig(**deployment.get("autoscaling_config", {}))
            assert set(deployment.get("ray_actor_options", {})) <= set(RayActorOptionsSchema.model_fields)


def test_render_detects_drift_and_rewrites(tmp_path: Path) -> None:
    for target in render_k8s.TARGETS:
        for rel in (target.source, target.manifest):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, tmp_path / rel)
    config = tmp_path / "serve_app" / "config.yaml"
    config.write_text(config.read_text().replace("default_max_tokens: 256", "default_max_tokens: 77"))
    assert render_k8s.main(["--check", "--root", str(tmp_path)]) == 1
    assert render_k8s.main(["--root", str(tmp_path)]) == 0
    assert render_k8s.main(["--check", "--root", str(tmp_path)]) == 0
    for target in (t for t in render_k8s.TARGETS if t.key == "serveConfigV2"):
        embedded = render_k8s.read_block((tmp_path / target.manifest).read_text(), target.key)
        assert embedded["applications"][0]["args"]["default_max_tokens"] == 77


@pytest.mark.parametrize("name", BUILDS)
def test_rayjob_runtime_env_matches_cluster_runtime_env(name: str, builds: dict) -> None:
    objects = builds[name]
    job = the(objects, "RayJob")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == RUNTIME_ENV["working_dir"] and env["excludes"] == RUNTIME_ENV["excludes"]
    for key, value in RUNTIME_ENV["env_vars"].items():
        assert env["env_vars"][key] == value or key == "HF_HUB_OFFLINE", key
    uri = urlparse(env["env_vars"]["MLFLOW_TRACKING_URI"])  # the in-cluster MLflow Service of this very build
    service = the(objects, "Service", "mlflow")
    assert uri.hostname == f"mlflow.{service['metadata']['namespace']}.svc"
    assert uri.port in {p["port"] for p in service["spec"]["ports"]}
    assert the(objects, "ConfigMap", "lorafleet-env")["data"]["MLFLOW_TRACKING_URI"] == uri.geturl()
    cluster = the(objects, "RayCluster", job["spec"]["clusterSelector"]["ray.io/cluster"])
    config = re.search(r"--config (\S+)", job["spec"]["entrypoint"]).group(1)
    assert (ROOT / config).is_file(), config
    storage = re.search(r"--set storage_path=(\S+)", job["spec"]["entrypoint"]).group(1)
    mounts = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(storage.startswith(m["mountPath"] + "/") for m in mounts), "checkpoints on the shared volume"
    hub = yaml.safe_load((ROOT / config).read_text())["base_model"] not in ("smollm2-135m", "tiny-llama")
    assert env["env_vars"]["HF_HUB_OFFLINE"] == ("0" if hub else "1"), "a Hub base model needs HF_HUB_OFFLINE=0"


def test_gpu_worker_groups_target_a100_nodes_and_autoscale(builds: dict) -> None:
    for name in ("base", "overlays/a100"):
        for spec in ray_cluster_specs(builds[name]):
            assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == ray.__version__
            (group,) = spec["workerGroupSpecs"]
            pod = group["template"]["spec"]
            resources = pod["containers"][0]["resources"]
            assert group["minReplicas"] == 0 < group["maxReplicas"]
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
            assert "A100" in json.dumps(pod["nodeSelector"]) and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        shared = the(builds[name], "PersistentVolumeClaim", "lorafleet-shared")
        assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    serve = yaml.safe_load(the(builds["overlays/a100"], "RayService")["spec"]["serveConfigV2"])
    lora = next(d for d in serve["applications"][0]["deployments"] if d["name"] == "LoraModel")
    assert lora["ray_actor_options"]["num_gpus"] == 1
    sweep = re.search(r"--config (\S+)", the(builds["overlays/a100"], "RayJob")["spec"]["entrypoint"]).group(1)
    assert serve["applications"][0]["args"]["base_model"] == yaml.safe_load((ROOT / sweep).read_text())["base_model"]


def test_local_overlay_is_cpu_only_and_small(builds: dict) -> None:
    objects = builds["overlays/local"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(objects)
    assert all(c["image"].endswith("-cpu") for c in containers(objects) if "/lorafleet/lorafleet:" in c["image"])
    (group,) = the(objects, "RayCluster")["spec"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu" and group["maxReplicas"] <= 2
    assert "workerGroupSpecs" not in the(objects, "RayService")["spec"]["rayClusterConfig"]
    assert "cpu-smollm2.yaml" in the(objects, "RayJob")["spec"]["entrypoint"]
    serve = yaml.safe_load(the(objects, "RayService")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["base_model"] == "smollm2-135m"
    assert the(objects, "PersistentVolumeClaim", "lorafleet-shared")["spec"]["accessModes"] == ["ReadWriteOnce"]
