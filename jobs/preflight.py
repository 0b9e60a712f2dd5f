"""Checks run before a sweep trains or writes anything: each failure is one line naming the problem.

Unknown tasks and bad fields are caught by the config itself; here: the base model resolves, every task's data
passes the same checks as `lorafleet data check` (files readable, format detected, every row valid, references fit
the metric, rows over max_seq_len counted), the trials fit the cluster, GPU-only options have a GPU, and MLflow
answers. Nothing is registered in MLflow or started on the cluster unless all of this passes.
"""

from __future__ import annotations

from typing import Any

from jobs.config import SweepConfig


class PreflightError(RuntimeError):
    pass


def check_datasets(config: SweepConfig, tokenizer: Any = None) -> dict[str, Any]:
    """Every task through `jobs.task_data.check` (what `lorafleet data check` prints); the first errors stop the
    sweep. Returns {task: report} (rows per split, detected format, data fingerprint, warnings)."""
    from jobs.task_data import DatasetError
    from jobs.task_data.check import check_task

    if tokenizer is None:
        from transformers import AutoTokenizer

        from adapters.base_models import resolve_base

        tokenizer = AutoTokenizer.from_pretrained(resolve_base(config.base_model).path)
    reports = {}
    for name, task in config.task_configs().items():
        try:
            report = check_task(name, task, tokenizer, config.training.max_seq_len)
        except DatasetError as err:
            raise PreflightError(f"tasks.{name}: {err}") from None
        if report.errors:
            more = f" (and {len(report.errors) - 1} more: run `lorafleet data check`)" if len(report.errors) > 1 else ""
            raise PreflightError(f"tasks.{name}: {report.errors[0]}{more}")
        reports[name] = report
    return reports


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
    base_path = check_base_model(config)
    sizes = check_datasets(config)
    check_resources(config, cluster)
    check_mlflow(config)
    check_storage(config)
    return {"datasets": sizes, "base_path": base_path}


def check_storage(config: SweepConfig) -> None:
    """`storage_path` must be one place for every node: a URI with a scheme pyarrow/fsspec opens, or on a cluster
    with more than one alive node an absolute path every node sees (jobs/storage.py)."""
    import ray

    from jobs import storage

    try:
        if storage.is_uri(config.storage_path):
            storage.check_uri_scheme(config.storage_path)
        elif ray.is_initialized():
            storage.check_shared_storage(config.storage_path, storage.alive_ray_nodes(),
                                         storage.ray_visible_on_every_node)  # fmt: skip
    except storage.StorageError as err:
        raise PreflightError(str(err)) from None
