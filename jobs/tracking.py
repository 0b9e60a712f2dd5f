"""MLflow for sweeps: one parent run per sweep, one nested run per adapter, registry versions and the champion.

Runs are found again by tags, so a resubmitted sweep (same name and config) reuses its parent run, skips adapters
whose run is done and resumes the others — no duplicate runs or registrations. Each adapter's run gets every
hyperparameter as a param; base model, task, dataset hash and git commit as tags; step metrics from the training
worker; final base-vs-adapter scores; the adapter files as artifacts; and a version of the registered model
`<prefix><task>` whose alias `champion` points at the best version by the task metric.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from jobs.config import SweepConfig, TrialSpec

TAG_SWEEP = "lorafleet.sweep"
TAG_CONFIG_HASH = "lorafleet.config_hash"
TAG_ADAPTER = "lorafleet.adapter"
TAG_DONE = "lorafleet.done"
TAG_VERSION = "lorafleet.registered_version"
CHAMPION = "champion"
ADAPTER_ARTIFACT = "adapter"


def git_commit() -> str:
    if os.environ.get("LORAFLEET_GIT_COMMIT"):
        return os.environ["LORAFLEET_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


class SweepTracker:
    def __init__(self, tracking_uri: str, experiment: str) -> None:
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def _find(self, filters: list[str]) -> Any | None:
        runs = self.client.search_runs([self.experiment_id], " and ".join(filters), max_results=1,
                                       order_by=["attributes.start_time DESC"])  # fmt: skip
        return runs[0] if runs else None

    # -- runs -----------------------------------------------------------------------------------------------------
    def parent_run(self, config: SweepConfig) -> str:
        config_hash = _hash(config.model_dump(mode="json"))
        run = self._find([f"tags.`{TAG_SWEEP}` = '{config.name}'", f"tags.`{TAG_CONFIG_HASH}` = '{config_hash}'",
                          "tags.`mlflow.parentRunId` IS NULL"])  # fmt: skip
        if run is not None:
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=config.name,
                                     tags={TAG_SWEEP: config.name, TAG_CONFIG_HASH: config_hash,
                                           "git_commit": git_commit(), "base_model": config.base_model})  # fmt: skip
        params = flatten("", config.model_dump(mode="json", exclude={"grid", "data"}), {})
        params["grid"] = json.dumps(config.grid, sort_keys=True)
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def child_run(self, parent_id: str, spec: TrialSpec, dataset_hash: str) -> tuple[str, bool]:
        """(run id, already done) for this adapter under the parent; created if missing."""
        run = self._find(
            [f"tags.`mlflow.parentRunId` = '{parent_id}'", f"tags.`{TAG_ADAPTER}` = '{spec.adapter_name}'"]
        )
        if run is not None:
            return run.info.run_id, run.data.tags.get(TAG_DONE) == "true"
        tags = {"mlflow.parentRunId": parent_id, TAG_SWEEP: spec.sweep, TAG_ADAPTER: spec.adapter_name,
                "base_model": spec.base_model, "task": spec.task, "dataset_hash": dataset_hash,
                "git_commit": git_commit(), "point_id": spec.point_id}  # fmt: skip
        run = self.client.create_run(self.experiment_id, run_name=spec.adapter_name, tags=tags)
        params = flatten("", spec.model_dump(mode="json", exclude={"point", "sweep"}), {})
        self._log_params(run.info.run_id, params)
        return run.info.run_id, False

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    # -- the end of an adapter's training -----------------------------------------------------------------------
    def finish_child(self, run_id: str, spec: TrialSpec, outcome: dict[str, Any], adapter_dir: Path,
                     metric_name: str, register: bool) -> str | None:  # fmt: skip
        """Final metrics, artifacts, registry version; returns the version (or None when not registering)."""
        final = {k: outcome[k] for k in ("base_score", "adapter_score", "train_seconds", "tokens_per_s",
                                         "peak_memory_mb", "steps", "train_loss")}  # fmt: skip
        final["delta"] = outcome["adapter_score"] - outcome["base_score"]
        self.log_metrics(run_id, outcome["steps"], {f"final_{k}": v for k, v in final.items()})
        self.client.log_artifacts(run_id, str(adapter_dir), ADAPTER_ARTIFACT)
        self.client.log_text(run_id, json.dumps(outcome.get("examples", []), indent=2), "eval_examples.json")
        version = self.register(run_id, spec, outcome, metric_name) if register else None
        self.client.set_tag(run_id, TAG_DONE, "true")
        self.client.set_terminated(run_id, "FINISHED")
        return version

    def register(self, run_id: str, spec: TrialSpec, outcome: dict[str, Any], metric_name: str) -> str:
        from mlflow.exceptions import MlflowException

        name = spec.registered_model
        existing = self.client.get_run(run_id).data.tags.get(TAG_VERSION)
        if existing:  # a retried finish: the version exists already
            return existing
        try:
            self.client.create_registered_model(name, tags={"task": spec.task, "metric": metric_name},
                                                description=f"lorafleet LoRA adapters for task {spec.task}")  # fmt: skip
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{ADAPTER_ARTIFACT}"
        tags = {"base_model": spec.base_model, "task": spec.task, "metric": metric_name, "sweep": spec.sweep,
                "adapter_name": spec.adapter_name, "point_id": spec.point_id,
                "adapter_score": f"{outcome['adapter_score']:.4f}", "base_score": f"{outcome['base_score']:.4f}",
                "lora_r": str(spec.lora.r)}  # fmt: skip
        version = self.client.create_model_version(name, source, run_id=run_id, tags=tags).version
        self.client.set_tag(run_id, TAG_VERSION, str(version))
        self.update_champion(name)
        return str(version)

    def update_champion(self, name: str) -> str | None:
        """Point alias `champion` at the version with the best adapter score (ties: the newest)."""
        versions = self.client.search_model_versions(f"name='{name}'")
        scored = [(float(v.tags["adapter_score"]), int(v.version)) for v in versions if "adapter_score" in v.tags]
        if not scored:
            return None
        best = str(max(scored)[1])
        self.client.set_registered_model_alias(name, CHAMPION, best)
        return best

    def finish_parent(self, parent_id: str, summary_rows: list[dict[str, Any]], chart: Path | None) -> None:
        self.client.log_text(parent_id, json.dumps(summary_rows, indent=2), "summary.json")
        if chart is not None and chart.exists():
            self.client.log_artifact(parent_id, str(chart))
        self.client.set_terminated(parent_id, "FINISHED")


def _hash(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]
