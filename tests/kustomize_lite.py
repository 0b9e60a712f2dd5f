"""`kustomize build` for tests/test_deploy_manifests.py: the real one where installed, else a minimal fallback.

`build(folder)` runs `kustomize build` or `kubectl kustomize` (kustomize v5 is built into kubectl) when either is
on PATH (`LORAFLEET_KUSTOMIZE=lite` forces the fallback), and `builder()` says which ran. The fallback,
`build_lite`, implements in plain Python only the features k8s/ uses; where the real one is installed,
test_deploy_manifests.py checks that both build the same objects.

Supported kustomization.yaml fields (anything else raises, so a new feature used in k8s/ fails here instead of
being silently ignored):

- `resources`: YAML files and folders holding a kustomization.yaml (built recursively);
- `patches`: `path` (+ `target` for JSON patches). A strategic-merge patch is an object naming apiVersion, kind and
  metadata.name: maps merge, scalars and lists replace, `null` deletes -- what kustomize does for custom resources.
  A patch holding a list of objects is refused (kustomize merges those by key for built-in kinds, which this
  does not implement). A JSON 6902 patch is a list of `add` / `remove` / `replace` operations;
- `images`: `name` -> `newName` / `newTag` for every `image` of a `containers` / `initContainers` list;
- `namespace` (set on every object except Namespaces) and `labels[].pairs` (added to metadata.labels only).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images", "namespace", "labels"}


class KustomizeError(Exception):
    """A kustomization this builder does not support, or a patch that does not apply."""


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def real_kustomize() -> tuple[str, ...] | None:
    """The command that runs a real `kustomize build`, or None (not installed, or LORAFLEET_KUSTOMIZE=lite)."""
    if os.environ.get("LORAFLEET_KUSTOMIZE") == "lite":
        return None
    if shutil.which("kustomize"):
        return ("kustomize", "build")
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ("kubectl", "kustomize")
    return None


def builder() -> str:
    """Which builder `build` uses, for test output."""
    command = real_kustomize()
    if command is None:
        return "tests/kustomize_lite.py (no kustomize or kubectl on PATH, or LORAFLEET_KUSTOMIZE=lite)"
    version = subprocess.run([command[0], "version", *(["--client"] if command[0] == "kubectl" else [])],
                             capture_output=True, text=True, timeout=60).stdout.strip().replace("\n", "; ")  # fmt: skip
    return f"{' '.join(command)} ({version})"


def build(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` prints: from the real kustomize where installed, else `build_lite`."""
    command = real_kustomize()
    if command is None:
        return build_lite(folder)
    done = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise KustomizeError(f"{' '.join(command)} {folder}: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def build_lite(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` would print (for the features above), in plain Python."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{folder}: unsupported kustomization fields {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        objects += build_lite(path) if path.is_dir() else load_docs(path)
    for patch in spec.get("patches", []):
        _apply_patch(objects, folder, patch)
    for image in spec.get("images", []):
        _set_images(objects, image)
    for obj in objects:
        if "namespace" in spec and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = spec["namespace"]
        for label in spec.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    ids = [(o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    if len(ids) != len(set(ids)):
        raise KustomizeError(f"{folder}: duplicate objects {sorted({i for i in ids if ids.count(i) > 1})}")
    return objects


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(wanted[key] == value for key, value in target.items())


def _only(objects: list[dict[str, Any]], target: dict[str, Any], where: str) -> dict[str, Any]:
    found = [obj for obj in objects if _matches(obj, target)]
    if len(found) != 1:
        raise KustomizeError(f"{where}: target {target} matches {len(found)} objects")
    return found[0]


def _apply_patch(objects: list[dict[str, Any]], folder: Path, patch: dict[str, Any]) -> None:
    if set(patch) - {"path", "target"}:
        raise KustomizeError(f"{folder}: unsupported patch fields {sorted(set(patch) - {'path', 'target'})}")
    (body,) = load_docs(folder / patch["path"])
    where = f"{folder / patch['path']}"
    if isinstance(body, list):
        if "target" not in patch:
            raise KustomizeError(f"{where}: a JSON patch needs a target")
        obj = _only(objects, patch["target"], where)
        for op in body:
            _json_op(obj, op, where)
        return
    group, _, version = body["apiVersion"].rpartition("/")
    target = {"group": group, "version": version, "kind": body["kind"], "name": body["metadata"]["name"]}
    _merge(_only(objects, {**target, **patch.get("target", {})}, where), body, where)


def _merge(into: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, where)
        else:
            if isinstance(value, list) and any(isinstance(item, dict) for item in value):
                raise KustomizeError(f"{where}: list of objects under {key!r}: use a JSON patch")
            into[key] = copy.deepcopy(value)


def _json_op(obj: dict[str, Any], op: dict[str, Any], where: str) -> None:
    keys = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
    parent: Any = obj
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "remove":
            del parent[index]
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        else:
            raise KustomizeError(f"{where}: unsupported op {kind!r}")
        return
    if kind in ("remove", "replace") and last not in parent:
        raise KustomizeError(f"{where}: {kind} of missing path {op['path']}")
    if kind == "remove":
        del parent[last]
    elif kind in ("add", "replace"):
        parent[last] = copy.deepcopy(op["value"])
    else:
        raise KustomizeError(f"{where}: unsupported op {kind!r}")


def _set_images(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
    elif isinstance(node, dict):
        for key in ("containers", "initContainers"):
            for container in node.get(key) or []:
                ref = container["image"]
                name, tag = ref.rsplit(":", 1) if ":" in ref.rsplit("/", 1)[-1] else (ref, "")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
        for value in node.values():
            _set_images(value, image)
