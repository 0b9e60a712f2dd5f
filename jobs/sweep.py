"""Fine-tuning sweep: one LoRA/QLoRA adapter per (task x grid point), trained in parallel on a Ray cluster,
tracked and registered in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.sweep --config jobs/configs/cpu-smollm2.yaml

Steps: validate the config -> preflight (datasets, base model, resources, MLflow; nothing is written before these
pass) -> one MLflow parent run -> Ray Tune runs one trial per adapter, at most `max_concurrent_trials` at a time,
each fitting its own TorchTrainer (see jobs/ray_train.py) -> every adapter registered as a version of
`<prefix><task>` with alias `champion` on the best -> summary table and leaderboard chart (also on the parent run).
With `strategy: cotrain`, each Tune trial is instead a group of up to `adapters_per_job` adapters trained together
over one base copy (jobs/ray_cotrain.py, jobs/cotrain_loop.py); every adapter still gets its own MLflow run and
registry version. Resubmitting the same config skips finished adapters and resumes unfinished ones from their
checkpoints.
`--set training.max_steps=20` overrides any field (same syntax as grid keys).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobs.config import ConfigError, SweepConfig, TrialSpec, field_path, load_config
from jobs.preflight import PreflightError, run_preflight
from jobs.storage import resolve_storage
from jobs.training_length import epochs_seen

log = logging.getLogger(__name__)


def run_trial(params: dict[str, Any], payloads: dict[str, dict[str, Any]]) -> None:
    """A Ray Tune function trainable: train (or skip, if already done) one adapter and register it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.ray_train import ADAPTER_DIR, OUTCOME_FILE, fit_adapter
    from jobs.tracking import SweepTracker

    trial = payloads[params["adapter"]]
    config = SweepConfig.model_validate(trial["config"])
    spec = TrialSpec.model_validate(trial["spec"])
    tracker = SweepTracker(config.mlflow.uri(), config.mlflow.experiment)
    run_id, done = tracker.child_run(trial["parent_id"], spec, trial["fingerprint"])
    if done:
        print(f"[{spec.adapter_name}] already trained and registered in run {run_id}: skipped", flush=True)
        tune.report({"skipped": 1})
        return
    folder = fit_adapter(config, spec, run_id, [TuneReportCallback()])
    outcome = json.loads((folder / OUTCOME_FILE).read_text())
    metric = spec.task_config.metric.name
    version = tracker.finish_child(run_id, spec, outcome, folder / ADAPTER_DIR, metric, config.mlflow.register_models)
    print(f"[{spec.adapter_name}] base {outcome['base_score']:.1f} -> adapter {outcome['adapter_score']:.1f} "
          f"({metric}, {outcome['epochs']:.2f} epochs); registered {spec.registered_model} version {version}",
          flush=True)  # fmt: skip
    tune.report({"adapter_score": outcome["adapter_score"], "base_score": outcome["base_score"], "skipped": 0})


def run_group(params: dict[str, Any], payloads: dict[str, dict[str, Any]]) -> None:
    """A Ray Tune function trainable for `strategy: cotrain`: co-train one group of adapters over one base (those
    not yet trained and registered), then finish each adapter's MLflow run and registry version like a solo run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.ray_cotrain import OUTCOMES_FILE, fit_group
    from jobs.tracking import SweepTracker

    group = payloads[params["group"]]
    config = SweepConfig.model_validate(group["config"])
    specs = [TrialSpec.model_validate(s) for s in group["specs"]]
    tracker = SweepTracker(config.mlflow.uri(), config.mlflow.experiment)
    run_ids, todo = {}, []
    for spec in specs:
        run_id, done = tracker.child_run(group["parent_id"], spec, group["fingerprints"][spec.task])
        tracker.client.set_tag(run_id, "cotrain_group", params["group"])
        run_ids[spec.adapter_name] = run_id
        if done:
            print(f"[{spec.adapter_name}] already trained and registered in run {run_id}: skipped", flush=True)
        else:
            todo.append(spec)
    if not todo:
        tune.report({"skipped": len(specs)})
        return
    print(f"[group {params['group']}] co-training {', '.join(s.adapter_name for s in todo)} over one "
          f"{config.base_model} base", flush=True)  # fmt: skip
    folder = fit_group(config, todo, {s.adapter_name: run_ids[s.adapter_name] for s in todo},
                       f"{config.name}-group-{params['group']}", [TuneReportCallback()])  # fmt: skip
    outcomes = json.loads((folder / OUTCOMES_FILE).read_text())
    scores = []
    for spec in todo:
        outcome, metric = outcomes[spec.adapter_name], spec.task_config.metric.name
        version = tracker.finish_child(run_ids[spec.adapter_name], spec, outcome, folder / spec.adapter_name, metric,
                                       config.mlflow.register_models)  # fmt: skip
        scores.append(outcome["adapter_score"])
        print(f"[{spec.adapter_name}] base {outcome['base_score']:.1f} -> adapter {outcome['adapter_score']:.1f} "
              f"({metric}, {outcome['steps']} steps); registered {spec.registered_model} version {version}",
              flush=True)  # fmt: skip
    tune.report({"adapter_score": sum(scores) / len(scores), "skipped": len(specs) - len(todo)})


def summary_rows(tracker: Any, parent_id: str, trials: list[TrialSpec]) -> list[dict[str, Any]]:
    from jobs.tracking import TAG_ADAPTER, TAG_VERSION

    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                      max_results=10_000)  # fmt: skip
    by_adapter = {r.data.tags.get(TAG_ADAPTER): r for r in runs}
    rows = []
    for spec in trials:
        run = by_adapter.get(spec.adapter_name)
        m = run.data.metrics if run else {}
        if "final_adapter_score" not in m:
            continue
        rows.append({"task": spec.task, "adapter": spec.adapter_name, "metric": spec.task_config.metric.name,
                     "base": m["final_base_score"], "adapter_score": m["final_adapter_score"],
                     "delta": m["final_delta"], "train_s": m["final_train_seconds"],
                     "epochs": m.get("final_epochs", float("nan")),
                     "tokens_per_s": m["final_tokens_per_s"], "steps": int(m["final_steps"]),
                     "version": f"{spec.registered_model}/{run.data.tags[TAG_VERSION]}"
                     if TAG_VERSION in run.data.tags else None, "run_id": run.info.run_id})  # fmt: skip
    return rows


def warn_short_training(config: SweepConfig, train_rows: dict[str, int]) -> None:
    """Say so when a task would see less than one epoch (a fixed max_steps on a larger dataset)."""
    for trial in config.trials():
        t = trial.training
        if t.max_steps is None or trial.task not in train_rows:
            continue
        world = config.resources.workers_per_adapter
        seen = epochs_seen(t.max_steps, t.micro_batch_size, t.grad_accum, world, train_rows[trial.task])
        if seen < 1 and not trial.bundled:
            print(f"  {trial.adapter_name}: warning: {t.max_steps} steps x {t.micro_batch_size * t.grad_accum * world} "
                  f"rows = {seen:.2f} epoch of {train_rows[trial.task]} training rows; set training.epochs (the "
                  f"default for your own tasks is measured: README \"Your own task\")", flush=True)  # fmt: skip


def apply_overrides(config: SweepConfig, overrides: list[str]) -> SweepConfig:
    """`--set section.field=value` (YAML values) on any field of the config, validated like the file itself."""
    data = config.model_dump(mode="json", exclude_unset=False)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: use section.field=value")
        *parents, leaf = key.strip().split(".")
        node, model = data, SweepConfig
        for depth, part in enumerate([*parents, leaf]):
            fields = getattr(model, "model_fields", None)
            if fields is not None and part not in fields:
                where = ".".join(parents[:depth]) or "the config"
                raise ConfigError(f"--set {key}: {where} has no field '{part}'")
            if part == leaf:
                break
            model = getattr(fields[part], "annotation", None) if fields is not None else None
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = field_path(first["loc"])
        raise ConfigError(f"--set: {where}: {first['msg'].removeprefix('Value error, ')}") from None


def run_sweep(config: SweepConfig) -> list[dict[str, Any]]:
    import ray
    from ray import tune

    from jobs.leaderboard import plot, print_table
    from jobs.tracking import SweepTracker

    ray.init(ignore_reinit_error=True, logging_level=logging.WARNING)
    config = config.with_paths_from(Path.cwd())
    checked = run_preflight(config, ray.cluster_resources())
    reports = checked["datasets"]
    print(f"preflight ok: {len(reports)} tasks, base {config.base_model}, MLflow {config.mlflow.uri()}")
    for name, report in reports.items():
        print(f"  {name}: {report.rows.get('train', 0)} train / {report.rows.get('eval', 0)} eval rows, format "
              f"{report.format}")  # fmt: skip
        for warning in report.warnings:
            print(f"  {name}: warning: {warning}")
    fingerprints = {name: report.fingerprint for name, report in reports.items()}
    warn_short_training(config, {name: report.rows.get("train", 0) for name, report in reports.items()})
    tracker = SweepTracker(config.mlflow.uri(), config.mlflow.experiment)
    parent_id = tracker.parent_run(config)
    trials = config.trials()
    # made absolute once, here: every trial and worker gets this path (each Ray process has its own cwd)
    config = config.model_copy(update={"storage_path": resolve_storage(config.storage_path)})
    payload = config.model_dump(mode="json")
    if config.strategy == "cotrain":
        from jobs.ray_cotrain import group_id

        groups = config.groups()
        print(f"sweep {config.name}: {len(trials)} adapters co-trained in {len(groups)} groups of at most "
              f"{config.adapters_per_job}, {config.max_concurrent_trials} groups at a time (MLflow parent run "
              f"{parent_id})", flush=True)  # fmt: skip
        payloads = {group_id(g): {"config": payload, "specs": [s.model_dump(mode="json") for s in g],
                                  "parent_id": parent_id, "fingerprints": fingerprints} for g in groups}  # fmt: skip
        trainable, key = run_group, "group"
    else:
        print(f"sweep {config.name}: {len(trials)} adapters, {config.max_concurrent_trials} at a time "
              f"(MLflow parent run {parent_id})", flush=True)  # fmt: skip
        payloads = {s.adapter_name: {"config": payload, "spec": s.model_dump(mode="json"), "parent_id": parent_id,
                                     "fingerprint": fingerprints[s.task]} for s in trials}  # fmt: skip
        trainable, key = run_trial, "adapter"
    storage = config.storage_path
    tuner = tune.Tuner(
        # the trial only drives its TorchTrainer (whose workers hold the CPUs/GPUs)
        # no CPU: even 0.01 per trial would leave 0.98 of a core free and keep a 1-CPU worker from starting
        tune.with_resources(tune.with_parameters(trainable, payloads=payloads), {"cpu": 0, "memory": 1}),
        param_space={key: tune.grid_search(list(payloads))},
        tune_config=tune.TuneConfig(max_concurrent_trials=config.max_concurrent_trials),
        # a trial lost with its node (the trial actor ran there) is retried: it finds its MLflow run and resumes
        # its TorchTrainer from the last checkpoint in `storage`
        run_config=tune.RunConfig(
            name=f"{config.name}-tune",
            storage_path=storage,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
        ),
    )
    results = tuner.fit()
    failures = [r for r in results if r.error is not None]
    rows = summary_rows(tracker, parent_id, trials)
    print_table(rows, f"sweep {config.name} on {config.base_model}")
    with tempfile.TemporaryDirectory() as tmp:
        chart = plot(rows, Path(tmp) / "leaderboard.png", f"{config.name}: base vs LoRA adapter") if rows else None
        tracker.finish_parent(parent_id, rows, chart)
    for failure in failures:
        lines = [line for line in str(failure.error).splitlines() if line.strip()]
        print(f"error: trial {failure.config.get(key)} failed: {lines[-1] if lines else failure.error}",
              file=sys.stderr)  # fmt: skip
    if failures:
        raise SystemExit(1)
    # MLflow 3.17's UI opens experiments in its GenAI view unless the URL (or the browser's last choice) says otherwise
    print(f"MLflow: {config.mlflow.uri()}/#/experiments/{tracker.experiment_id}/runs/{parent_id}"
          "?workflowType=machine_learning")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        config = apply_overrides(load_config(args.config), args.overrides)
        run_sweep(config)
    except (ConfigError, PreflightError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
