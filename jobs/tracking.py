"""MLflow for sweeps: one parent run per sweep, one nested run per adapter, registry versions and the champion.

Runs are found again by tags, so a resubmitted sweep (same name and config) reuses its parent run, skips adapters
whose run is done and resumes the others — no duplicate runs or registrations. Each adapter's run gets every
hyperparameter as a param; base model, task, dataset hash and git commit as tags; step metrics from the training
worker; final base-vs-adapter scores (`final_*`, and plain `adapter_score`, `delta`, ... for the UI's charts); the
adapter files and a pyfunc model folder holding them (`model/`: `mlflow.pyfunc.load_model` / `mlflow models serve`
work on it) as artifacts; and a version of the registered model `<prefix><task>` (source: that `model/` folder)
whose alias `champion` points at the best version by the task metric. The experiment is tagged as a machine-learning
experiment (MLflow 3.17's UI still opens a browser without a saved choice in its GenAI view unless the link carries
`?workflowType=machine_learning`, as the sweep's printed link does); the parent run holds the summary table and the
leaderboard chart.

An MLflow server that restarts mid-sweep costs time, not data: every client call is retried with backoff while
the server is unreachable (connection refused or reset, timeouts, 5xx), for up to `$LORAFLEET_MLFLOW_RETRY_S`
seconds (default 180) from the first failure, then `TrackingUnavailable` says which call gave up. That is on top of
MLflow's own urllib3 retries (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, default 7 with backoff 0, 4, 8 ... 120 s, about
4 minutes per call). Those retries also re-send POSTs whose reply was lost, so the creating calls are made
idempotent here: a duplicated run (same parent and adapter tags) or model version (same run) is deleted again,
keeping the oldest; re-sent metrics carry their original timestamp and step, which the server deduplicates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.config import SweepConfig, TrialSpec
from jobs.mlflow_retry import (
    RetryingClient,
    _unique_violation,
)

TAG_SWEEP = "lorafleet.sweep"
TAG_CONFIG_HASH = "lorafleet.config_hash"
TAG_ADAPTER = "lorafleet.adapter"
TAG_DONE = "lorafleet.done"
TAG_VERSION = "lorafleet.registered_version"
CHAMPION = "champion"
ADAPTER_ARTIFACT = "adapter"
MODEL_ARTIFACT = "model"  # the MLflow pyfunc model folder (adapters/mlflow_pyfunc.py); registry versions point here
# The experiment kind MLflow 3's UI reads ("Machine learning", not "GenAI apps & agents"; its runs, not its traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Comparable per-adapter metrics, logged once at top level (plain names) next to the `final_*` ones: the outcome
# key each is read from ("delta" is computed). Step metrics (`loss`, `tokens_per_s`, `lr`) keep their history.
TOP_LEVEL_METRICS = {"adapter_score": "adapter_score", "base_score": "base_score", "delta": "delta",
                     "train_loss": "train_loss", "train_tokens_per_s": "tokens_per_s",
                     "train_seconds": "train_seconds", "epochs": "epochs"}  # fmt: skip


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
    def __init__(self, tracking_uri: str, experiment: str, retry_s: float | None = None) -> None:
        """No request is made here: the experiment is looked up (or created) on first use."""
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.experiment = experiment
        self.client: Any = RetryingClient(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri),
                                          tracking_uri, retry_s)  # fmt: skip
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                    )
                except MlflowException as err:  # a create re-sent after a lost reply, or another sweep's
                    if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                        raise
                    found = self.client.get_experiment_by_name(self.experiment)
            if self._experiment_id is None:
                self._experiment_id = found.experiment_id
                if EXPERIMENT_KIND_TAG not in (found.tags or {}):  # made before (or by hand): a kind the user
                    # chose in the UI is kept
                    self.client.set_experiment_tag(self._experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return self._experiment_id

    def _find_all(self, filters: list[str]) -> list[Any]:
        """Active runs matching `filters`, oldest first (start time, then run id: the same order everywhere)."""
        runs = self.client.search_runs([self.experiment_id], " and ".join(filters), max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _find(self, filters: list[str]) -> Any | None:
        runs = self._find_all(filters)
        return runs[0] if runs else None

    def _create_once(self, filters: list[str], create: Callable[[], Any]) -> str:
        """Create a run that `filters` must find exactly once. A create re-sent after its reply was lost (MLflow's
        retries, or ours) can make two: keep the oldest, delete the rest."""
        created = create().info.run_id
        runs = self._find_all(filters)
        if not runs:  # not visible yet: trust the one we got
            return created
        for extra in runs[1:]:
            print(f"deleting duplicate MLflow run {extra.info.run_id} (a re-sent create) of {runs[0].info.run_id}",
                  file=sys.stderr, flush=True)  # fmt: skip
            self.client.delete_run(extra.info.run_id)
        return runs[0].info.run_id

    # -- runs -----------------------------------------------------------------------------------------------------
    def parent_run(self, config: SweepConfig) -> str:
        config_hash = _hash(config.model_dump(mode="json"))
        filters = [f"tags.`{TAG_SWEEP}` = '{config.name}'", f"tags.`{TAG_CONFIG_HASH}` = '{config_hash}'",
                   "tags.`mlflow.parentRunId` IS NULL"]  # fmt: skip
        run = self._find(filters)
        if run is not None:
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        tags = {TAG_SWEEP: config.name, TAG_CONFIG_HASH: config_hash, "git_commit": git_commit(),
                "base_model": config.base_model}  # fmt: skip
        run_id = self._create_once(filters, lambda: self.client.create_run(self.experiment_id, run_name=config.name,
                                                                           tags=tags))  # fmt: skip
        params = flatten("", config.model_dump(mode="json", exclude={"grid", "data"}), {})
        params["grid"] = json.dumps(config.grid, sort_keys=True)
        self._log_params(run_id, params)
        return run_id

    def child_run(self, parent_id: str, spec: TrialSpec, dataset_hash: str) -> tuple[str, bool]:
        """(run id, already done) for this adapter under the parent; created if missing."""
        filters = [f"tags.`mlflow.parentRunId` = '{parent_id}'", f"tags.`{TAG_ADAPTER}` = '{spec.adapter_name}'"]
        run = self._find(filters)
        if run is not None:
            return run.info.run_id, run.data.tags.get(TAG_DONE) == "true"
        tags = {"mlflow.parentRunId": parent_id, TAG_SWEEP: spec.sweep, TAG_ADAPTER: spec.adapter_name,
                "base_model": spec.base_model, "task": spec.task, "dataset_hash": dataset_hash,
                "git_commit": git_commit(), "point_id": spec.point_id}  # fmt: skip
        run_id = self._create_once(filters, lambda: self.client.create_run(self.experiment_id,
                                                                           run_name=spec.adapter_name, tags=tags))  # fmt: skip
        params = flatten("", spec.model_dump(mode="json", exclude={"point", "sweep"}), {})
        self._log_params(run_id, params)
        return run_id, False

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, step: int, metrics: dict[str, float], timestamp_ms: int | None = None) -> None:
        """One batch at one step. Pass the time the values were measured when re-sending a delayed batch: a batch
        re-sent with the same timestamp is deduplicated by the server (its rows' key includes it)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_steps(self, run_id: str, batches: list[tuple[int, int, dict[str, float]]]) -> None:
        """Several (step, timestamp ms, metrics) batches in one request (at most 1,000 metrics in all)."""
        from mlflow.entities import Metric

        items = [Metric(k, float(v), ts, step) for step, ts, metrics in batches for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=items)

    # -- the end of an adapter's training -----------------------------------------------------------------------
    def finish_child(self, run_id: str, spec: TrialSpec, outcome: dict[str, Any], adapter_dir: Path,
                     metric_name: str, register: bool) -> str | None:  # fmt: skip
        """Final metrics (as `final_*` and, for comparing adapters in the UI's charts, the TOP_LEVEL_METRICS), the
        adapter files and a pyfunc model folder holding them as artifacts, registry version; returns the version (or
        None when not registering)."""
        final = {k: outcome[k] for k in ("base_score", "adapter_score", "train_seconds", "tokens_per_s",
                                         "peak_memory_mb", "steps", "train_loss", "epochs")}  # fmt: skip
        final["delta"] = improvement(metric_name, outcome["base_score"], outcome["adapter_score"])
        final.update({k: v for k, v in outcome.get("details", {}).items() if isinstance(v, int | float)})
        metrics = {f"final_{k}": v for k, v in final.items()}
        metrics.update({name: final[key] for name, key in TOP_LEVEL_METRICS.items()})
        self.log_metrics(run_id, outcome["steps"], metrics)
        self.client.log_artifacts(run_id, str(adapter_dir), ADAPTER_ARTIFACT)
        self.log_pyfunc_model(run_id, spec, adapter_dir)
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
        except MlflowException as err:  # exists (or another trial of the task is creating it right now)
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code) and not _unique_violation(err):
                raise
        version = self._version_of_run(name, run_id)  # created before, its tag not set (a finish cut short)
        if version is None:
            run = self.client.get_run(run_id)
            source, run_tags = f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run.data.tags
            tags = {"base_model": spec.base_model, "task": spec.task, "metric": metric_name, "sweep": spec.sweep,
                    "adapter_name": spec.adapter_name, "point_id": spec.point_id,
                    "adapter_score": f"{outcome['adapter_score']:.4f}", "base_score": f"{outcome['base_score']:.4f}",
                    "lora_r": str(spec.lora.r), **training_record(spec, outcome, run_tags)}  # fmt: skip
            created = str(self.client.create_model_version(name, source, run_id=run_id, tags=tags).version)
            version = self._version_of_run(name, run_id) or created
        self.client.set_tag(run_id, TAG_VERSION, version)
        self.update_champion(name)
        return version

    def log_pyfunc_model(self, run_id: str, spec: TrialSpec, adapter_dir: Path) -> None:
        """The adapter as an MLflow pyfunc model folder (`MODEL_ARTIFACT`): `mlflow.pyfunc.load_model` and
        `mlflow models serve` load the base by name and apply it (adapters/mlflow_pyfunc.py)."""
        import tempfile

        from adapters.mlflow_pyfunc import save_pyfunc

        with tempfile.TemporaryDirectory() as tmp:
            folder = save_pyfunc(adapter_dir, Path(tmp) / MODEL_ARTIFACT, spec.base_model)
            self.client.log_artifacts(run_id, str(folder), MODEL_ARTIFACT)

    def _version_of_run(self, name: str, run_id: str) -> str | None:
        """The (lowest) version of `name` made from this run; duplicates from a re-sent create are deleted."""
        versions = sorted(self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'"),
                          key=lambda v: int(v.version))  # fmt: skip
        for extra in versions[1:]:
            print(f"deleting duplicate version {extra.version} (a re-sent create) of {name} version "
                  f"{versions[0].version}", file=sys.stderr, flush=True)  # fmt: skip
            self.client.delete_model_version(name, extra.version)
        return str(versions[0].version) if versions else None

    def update_champion(self, name: str) -> str | None:
        """Point alias `champion` at the version with the best adapter score (ties: the newest).

        Trials of one task can finish together (after an MLflow outage, for one). The server sets an alias by
        select-then-insert, so two at once can fail with a unique-constraint error, and a writer that read the
        versions before another's registration can overwrite a better choice: so read, set, read again until the
        alias is the best of what the second read sees (bounded)."""
        best = None
        for attempt in range(6):
            best = self._best_version(name)
            if best is None:
                return None
            try:
                self.client.set_registered_model_alias(name, CHAMPION, best)
            except Exception as err:  # a RestException from a server, sqlalchemy's own error from a local store
                if not _unique_violation(err):
                    raise
                time.sleep(0.2 * (attempt + 1))
                continue
            if self._best_version(name) == best:
                return best
        return best

    def _best_version(self, name: str) -> str | None:
        """Highest adapter score (lowest, for a lower-is-better metric like eval_loss); ties: the newest."""
        versions = self.client.search_model_versions(f"name='{name}'")
        scored = [(float(v.tags["adapter_score"]) * (-1 if v.tags.get("metric") in LOWER_IS_BETTER else 1),
                   int(v.version)) for v in versions if "adapter_score" in v.tags]  # fmt: skip
        return str(max(scored)[1]) if scored else None

    def finish_parent(self, parent_id: str, summary_rows: list[dict[str, Any]], chart: Path | None) -> None:
        """The summary as summary.json and as an MLflow table (the UI's artifact view shows it as a table, and
        `mlflow.load_table` reads it), the leaderboard chart as a file and as an image the chart view shows, and
        how many adapters finished and the best delta as the parent's own metrics."""
        self.client.log_text(parent_id, json.dumps(summary_rows, indent=2), "summary.json")
        if summary_rows:
            columns = list(dict.fromkeys(k for row in summary_rows for k in row))
            table = {c: [row.get(c) for row in summary_rows] for c in columns}
            self.client.log_table(parent_id, data=table, artifact_file=SUMMARY_TABLE)
            self.log_metrics(parent_id, 0, {"adapters": len(summary_rows),
                                            "best_delta": max(float(r["delta"]) for r in summary_rows)})  # fmt: skip
        if chart is not None and chart.exists():
            self.client.log_artifact(parent_id, str(chart))
            from PIL import Image

            with Image.open(chart) as image:
                self.client.log_image(parent_id, image.convert("RGB"), key="leaderboard", step=0)
        self.client.set_terminated(parent_id, "FINISHED")


LOWER_IS_BETTER = {"eval_loss"}
SUMMARY_TABLE = "summary_table.json"


def improvement(metric_name: str, base: float, adapter: float) -> float:
    """The adapter's gain over the base, positive when better (for eval_loss: the loss it removed)."""
    return base - adapter if metric_name in LOWER_IS_BETTER else adapter - base


def training_record(spec: TrialSpec, outcome: dict[str, Any], run_tags: dict[str, str]) -> dict[str, str]:
    """What a registry version records about how it was trained: data fingerprint, format, metric options, the
    prompt it was trained with, epochs seen (MLflow tag values are strings)."""
    task = spec.task_config
    prompt = outcome.get("prompt_format") or {}
    return {"data_fingerprint": run_tags.get("dataset_hash", ""), "data_format": str(prompt.get("format", task.format)),
            "metric_config": task.metric.model_dump_json(exclude_defaults=True), "epochs": f"{outcome['epochs']:.3f}",
            "prompt_mode": str(prompt.get("mode", "")),
            "system_prompt": str(prompt.get("system_prompt") or prompt.get("prompt_prefix") or "")[:5000],
            "bundled_task": str(spec.bundled).lower()}  # fmt: skip


def _hash(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]
