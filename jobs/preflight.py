"""Checks run before a sweep trains or writes anything: each failure is one line naming the problem.

Unknown tasks and bad fields are caught by the config itself; here: dataset files exist and every row has the
required fields, the base model resolves, the trials fit the cluster, GPU-only options have a GPU, and MLflow
answers. Nothing is registered in MLflow unless all of this passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.config import SweepConfig
from jobs.tasks import DatasetError, UnknownTask, load_split


class PreflightError(RuntimeError):
    pass


def check_datasets(config: SweepConfig) -> dict[str, int]:
    sizes = {}
    for task in config.task_names():
        paths = config.data.get(task)
        for split in ("train", "eval"):
            path = Path(getattr(paths, split)) if paths else None
            try:
                rows = load_split(task, split, path)
            except (FileNotFoundError, DatasetError, UnknownTask) as err:
                raise PreflightError(f"dataset: {err}") from None
            sizes[f"{task}/{split}"] = len(rows)
    return sizes


def check_base_model(config: SweepConfig) -> str:
    from transformers import AutoConfig

    from adapters.base_models import BaseModelNotFound, resolve_base

    try:
        resolved = resolve_base(config.base_model)
        AutoConfig.from_pretrained(resolved.path)
    except BaseModelNotFound as err:
        raise PreflightError(f"base_model: {err}") from None
    except OSError as err:
        raise PreflightError(f"base_model: '{config.base_model}' not found: {str(err).splitlines()[0]}") from None
    return resolved.path


def check_resources(config: SweepConfig, cluster: dict[str, float]) -> None:
    res = config.resources
    if config.training.optimizer.startswith("paged") and not res.use_gpu:
        raise PreflightError(f"training.optimizer: {config.training.optimizer} needs GPUs (resources.gpus_per_worker)")
    if not res.check_cluster:
        return
    need_cpu = res.workers_per_adapter * res.cpus_per_worker
    need_gpu = res.workers_per_adapter * res.gpus_per_worker
    have_cpu, have_gpu = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if need_cpu > have_cpu:
        raise PreflightError(f"resources: one adapter needs {need_cpu:g} CPUs ({res.workers_per_adapter} workers x "
                             f"{res.cpus_per_worker:g}); the cluster has {have_cpu:g}")  # fmt: skip
    if need_gpu > have_gpu:
        raise PreflightError(f"resources: one adapter needs {need_gpu:g} GPUs ({res.workers_per_adapter} workers x "
                             f"{res.gpus_per_worker:g}); the cluster has {have_gpu:g}")  # fmt: skip


def check_mlflow(config: SweepConfig) -> None:
    import httpx

    uri = config.mlflow.uri()
    if "://" not in uri or uri.startswith("file:"):
        return
    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        raise PreflightError(f"mlflow.tracking_uri: {uri} does not answer ({type(err).__name__})") from None


def run_preflight(config: SweepConfig, cluster: dict[str, Any]) -> dict[str, Any]:
    sizes = check_datasets(config)
    base_path = check_base_model(config)
    check_resources(config, cluster)
    check_mlflow(config)
    return {"datasets": sizes, "base_path": base_path}
