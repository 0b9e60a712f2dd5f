"""Render the generated fields of lorafleet's Kubernetes manifests (k8s/) from their sources of truth.

Two files are maintained elsewhere and embedded in KubeRay objects as YAML strings:

- `serve_app/config.yaml` -> the RayService's `spec.serveConfigV2` (k8s/base/rayservice.yaml, and the A100 variant
  in k8s/overlays/a100/rayservice-serve-a100.yaml);
- `cluster/runtime_env_cluster.yaml` (Hub online) -> the RayJob's `spec.runtimeEnvYAML` (k8s/base/rayjob.yaml), and
  `cluster/runtime_env.yaml` (the local stack's, offline) -> the CPU variant in k8s/overlays/local/rayjob-cpu.yaml.

Each rendered document is its source parsed as YAML plus a short, explicit list of overrides (`TARGETS` below):
what has to differ inside a pod (the Serve proxy listens on 0.0.0.0, the job talks to the in-cluster MLflow) or on
A100s (base model, GPUs per replica). Everything else is copied, so editing the source and re-running this keeps
the manifests in step; tests/test_deploy_manifests.py fails when they drift.

    python -m cluster.render_k8s                   # rewrite the generated blocks in place
    python -m cluster.render_k8s --check           # exit 1 (and name the files) if a manifest is out of date
    python -m cluster.render_k8s --print serve-a100 > /tmp/serve-a100.yaml   # one rendered document, e.g. for
                                                   # `serve deploy` on a cluster-launcher cluster
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

# The in-cluster MLflow service (k8s/base/mlflow.yaml, namespace from k8s/base/kustomization.yaml).
MLFLOW_URL = "http://mlflow.lorafleet.svc:5000"

# Override paths are "/"-separated keys; on a list, a segment picks the item whose `name` equals it (or an index).
# Every segment but the last must already exist, so a restructured source fails loudly instead of half-rendering.
SERVE_IN_POD: dict[str, Any] = {
    "http_options/host": "0.0.0.0",  # the serve Service reaches the head's proxy on the pod IP, not 127.0.0.1
}
SERVE_A100: dict[str, Any] = {
    **SERVE_IN_POD,
    "applications/lorafleet/runtime_env/env_vars/HF_HUB_OFFLINE": "0",  # the base comes from the Hub (HF_HOME)
    "applications/lorafleet/args/base_model": "mistralai/Mistral-7B-v0.1",  # = jobs/configs/a100-mistral7b.yaml
    "applications/lorafleet/args/adapters_per_replica": 64,
    "applications/lorafleet/args/engine/max_running": 64,
    "applications/lorafleet/args/engine/max_seq_len": 2048,
    "applications/lorafleet/args/engine/max_loras": 16,
    "applications/lorafleet/deployments/LoraModel/max_ongoing_requests": 128,
    "applications/lorafleet/deployments/LoraModel/autoscaling_config/max_replicas": 8,
    "applications/lorafleet/deployments/LoraModel/autoscaling_config/target_ongoing_requests": 32,
    "applications/lorafleet/deployments/LoraModel/ray_actor_options/num_cpus": 4,
    "applications/lorafleet/deployments/LoraModel/ray_actor_options/num_gpus": 1,
}
RUNTIME_ENV_IN_CLUSTER: dict[str, Any] = {
    "env_vars/MLFLOW_TRACKING_URI": MLFLOW_URL,
}


@dataclass(frozen=True)
class Target:
    """One generated YAML string: `source` + `overrides`, written as the block scalar `key: |` of `manifest`."""

    name: str
    source: str
    manifest: str
    key: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


TARGETS: tuple[Target, ...] = (
    Target("serve", "serve_app/config.yaml", "k8s/base/rayservice.yaml", "serveConfigV2", SERVE_IN_POD),
    Target(
        "serve-a100",
        "serve_app/config.yaml",
        "k8s/overlays/a100/rayservice-serve-a100.yaml",
        "serveConfigV2",
        SERVE_A100,
    ),
    # a100-mistral7b.yaml downloads its base model (into HF_HOME on the PVC): the cluster runtime env has the Hub on
    Target(
        "runtime-env",
        "cluster/runtime_env_cluster.yaml",
        "k8s/base/rayjob.yaml",
        "runtimeEnvYAML",
        RUNTIME_ENV_IN_CLUSTER,
    ),
    Target(
        "runtime-env-local",
        "cluster/runtime_env.yaml",
        "k8s/overlays/local/rayjob-cpu.yaml",
        "runtimeEnvYAML",
        RUNTIME_ENV_IN_CLUSTER,
    ),
)


class RenderError(Exception):
    """A source or manifest that cannot be rendered (bad override path, missing block)."""


def target_named(name: str) -> Target:
    for target in TARGETS:
        if target.name == name:
            return target
    raise RenderError(f"no target {name!r}; known: {', '.join(t.name for t in TARGETS)}")


def _child(node: Any, segment: str, path: str) -> Any:
    if isinstance(node, Mapping):
        if segment not in node:
            raise RenderError(f"{path}: no key {segment!r}")
        return node[segment]
    if isinstance(node, Sequence) and not isinstance(node, str):
        for index, item in enumerate(node):
            if (isinstance(item, Mapping) and item.get("name") == segment) or str(index) == segment:
                return item
        raise RenderError(f"{path}: no list item named {segment!r}")
    raise RenderError(f"{path}: {segment!r} is below a scalar")


def get_path(doc: Any, path: str) -> Any:
    """The value at an override path (KeyError-like RenderError when absent)."""
    node = doc
    for segment in path.split("/"):
        node = _child(node, segment, path)
    return node


def set_path(doc: Any, path: str, value: Any) -> None:
    """Set the value at an override path; only the last key may be new."""
    *parents, last = path.split("/")
    node = doc
    for segment in parents:
        node = _child(node, segment, path)
    if not isinstance(node, dict):
        raise RenderError(f"{path}: the parent of {last!r} is not a mapping")
    node[last] = copy.deepcopy(value)


def apply_overrides(doc: Any, overrides: Mapping[str, Any]) -> Any:
    """A deep copy of `doc` with every override set."""
    result = copy.deepcopy(doc)
    for path, value in overrides.items():
        set_path(result, path, value)
    return result


def render_document(target: Target, root: Path = REPO_ROOT) -> Any:
    """The parsed document `target` embeds: its source read now, with its overrides applied."""
    source = yaml.safe_load((root / target.source).read_text())
    return apply_overrides(source, target.overrides)


def render_text(target: Target, root: Path = REPO_ROOT) -> str:
    """The YAML text embedded in the manifest (a generated-file notice, then the document)."""
    body = yaml.safe_dump(render_document(target, root), sort_keys=False, default_flow_style=False, width=120)
    return f"# GENERATED from {target.source} by `python -m cluster.render_k8s` ({target.name}); do not edit.\n{body}"


def _block_header(key: str) -> re.Pattern[str]:
    return re.compile(rf"^(?P<indent> *){re.escape(key)}: \|[-+]?[ \t]*(#.*)?$")


def block_span(lines: list[str], key: str) -> tuple[int, int, str]:
    """(first, end, indent) of the block scalar `key: |` in `lines`: body lines are lines[first:end]."""
    header = _block_header(key)
    matches = [(i, m) for i, line in enumerate(lines) if (m := header.match(line))]
    if len(matches) != 1:
        raise RenderError(f"expected exactly one `{key}: |` line, found {len(matches)}")
    start, match = matches[0]
    indent = match.group("indent")
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > len(indent)):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # trailing blank lines belong to what follows
        end -= 1
    return start + 1, end, indent


def replace_block(text: str, key: str, body: str) -> str:
    """`text` with the body of its block scalar `key: |` replaced by `body`, indented two more than `key`."""
    lines = text.splitlines()
    first, end, indent = block_span(lines, key)
    new = [f"{indent}  {line}" if line.strip() else "" for line in body.splitlines()]
    trailing = "\n" if text.endswith("\n") else ""
    return "\n".join(lines[:first] + new + lines[end:]) + trailing


def read_block(text: str, key: str) -> Any:
    """The parsed content of the block scalar `key: |` of a manifest's text."""
    lines = text.splitlines()
    first, end, indent = block_span(lines, key)
    return yaml.safe_load("\n".join(line[len(indent) + 2 :] for line in lines[first:end]))


def render_all(root: Path = REPO_ROOT) -> dict[Path, tuple[str, str]]:
    """{manifest path: (current text, rendered text)} over all targets (several targets may share a file)."""
    out: dict[Path, tuple[str, str]] = {}
    for target in TARGETS:
        path = root / target.manifest
        if not path.is_file():
            raise RenderError(f"{target.manifest}: missing (it holds the `{target.key}` of target {target.name})")
        if path not in out:
            text = path.read_text()
            out[path] = (text, text)
        current, rendered = out[path]
        try:
            rendered = replace_block(rendered, target.key, render_text(target, root))
        except RenderError as err:
            raise RenderError(f"{target.manifest}: {err}") from None
        out[path] = (current, rendered)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.render_k8s", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a manifest differs from its rendering")
    mode.add_argument("--print", dest="print_name", metavar="TARGET", help=f"one of {[t.name for t in TARGETS]}")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.print_name:
            sys.stdout.write(render_text(target_named(args.print_name), args.root))
            return 0
        results = render_all(args.root)
    except (RenderError, OSError, yaml.YAMLError) as err:
        print(f"render_k8s: error: {err}", file=sys.stderr)
        return 2
    stale = [path for path, (current, rendered) in results.items() if current != rendered]
    if args.check:
        for path in stale:
            print(f"render_k8s: {path.relative_to(args.root)} is out of date: run python -m cluster.render_k8s")
        return 1 if stale else 0
    for path in stale:
        path.write_text(results[path][1])
        print(f"render_k8s: wrote {path.relative_to(args.root)}")
    if not stale:
        print("render_k8s: all manifests up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
