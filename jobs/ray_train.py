"""The Ray Train layer for one adapter: `train_worker` is the TorchTrainer's per-worker function, and
`fit_adapter` builds and fits that TorchTrainer (DDP over N workers, gloo on CPU / nccl on GPU, checkpoints in
the run's storage, `FailureConfig(max_failures)` resuming from the latest checkpoint). The training itself is
`jobs.train_loop.train`, plain Python.

Where a restart's checkpoint comes from (Ray 2.60, Train V2): the TorchTrainer's controller records each reported
checkpoint in `<storage_path>/<name>/checkpoint_manager_snapshot.json` when it next polls the workers (every
`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s). A worker group restarted by that controller gets the latest recorded one;
so does a new TorchTrainer of the same `name` in the same storage (a Tune retry of the trial after its actor was lost
with its node, or a resubmitted sweep): its controller loads the snapshot, and `ray.train.get_checkpoint()` returns
it. No Tune-level checkpoint is needed. A checkpoint written to storage but not yet recorded when its node dies is
not resumed from; the one before it is.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs.config import SweepConfig, TrialSpec
from jobs.gpu_share import cap_memory
from jobs.storage import is_uri

log = logging.getLogger(__name__)
OUTCOME_FILE = "outcome.json"
ADAPTER_DIR = "adapter"


class RayHooks:
    """Metrics to MLflow (rank 0) and the job log; checkpoints to Ray Train storage (every rank reports).

    MLflow being down (restarted, say) neither stalls training nor loses metrics: `log` queues each batch with its
    step and the time it was measured, and a sender thread delivers the queue in order, retrying while MLflow is
    unreachable (a batch re-sent after a lost reply carries the same timestamp and is deduplicated by the server).
    The run's last log call (its final step) waits until the queue is delivered, for up to
    `jobs.mlflow_retry.retry_seconds()`, and names any steps it had to give up on. `close()` does the same wait."""

    def __init__(self, spec: TrialSpec, run_id: str, tracking_uri: str, experiment: str, rank: int) -> None:
        self.spec, self.rank = spec, rank
        self.run_id = run_id
        self._tracker = None
        self._queue: deque[tuple[int, int, dict[str, float]]] = deque()  # (step, timestamp ms, metrics)
        self._changed = threading.Condition()
        self._sender: threading.Thread | None = None
        if rank == 0:
            from jobs.tracking import SweepTracker

            self._tracker = SweepTracker(tracking_uri, experiment)  # makes no request

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        print(f"[{self.spec.adapter_name}] step {step:5d} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
              flush=True)  # fmt: skip
        with self._changed:
            self._queue.append((step, int(time.time() * 1000), {k: float(v) for k, v in metrics.items()}))
            self._changed.notify_all()
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_forever, name="mlflow-metrics", daemon=True)
                self._sender.start()
        if self._is_last_step(step, metrics):
            self.close()

    def close(self, timeout: float | None = None) -> bool:
        """Wait until every queued batch reached MLflow (up to `timeout`, default the tracking retry budget).
        False, after saying which steps are missing, if MLflow did not take them in time."""
        if self.rank != 0:
            return True
        from jobs.mlflow_retry import retry_seconds

        budget = retry_seconds() if timeout is None else timeout
        deadline = time.monotonic() + budget
        with self._changed:
            if self._queue:
                print(f"[{self.spec.adapter_name}] waiting up to {budget:g} s for MLflow to take "
                      f"{len(self._queue)} queued metric batches", flush=True)  # fmt: skip
            while self._queue and time.monotonic() < deadline:
                self._changed.wait(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            missing = [step for step, _, _ in self._queue]
        if missing:
            print(f"[{self.spec.adapter_name}] error: MLflow did not take {len(missing)} metric batches (steps "
                  f"{missing[0]}-{missing[-1]}) within {budget:g} s; they are not in the run", flush=True)  # fmt: skip
        return not missing

    def _is_last_step(self, step: int, metrics: dict[str, float]) -> bool:
        """The train loop's final log call: step == max_steps, or (epoch-based runs) the epoch count reached, or
        early stopping's last eval."""
        t = self.spec.training
        if "early_stopped_at" in metrics:
            return True
        if t.max_steps is not None:
            return step >= t.max_steps
        return t.epochs is not None and metrics.get("epoch", 0.0) >= t.epochs

    def _send_forever(self) -> None:
        from jobs.mlflow_retry import TrackingUnavailable, is_transient

        assert self._tracker is not None
        while True:
            with self._changed:
                while not self._queue:
                    self._changed.wait()
                batches, size = [], 0  # what queued up meanwhile goes in one request (MLflow takes 1,000 metrics)
                for batch in self._queue:
                    if batches and size + len(batch[2]) > 1000:
                        break
                    batches.append(batch)
                    size += len(batch[2])
            try:
                self._tracker.log_steps(self.run_id, batches)
            except TrackingUnavailable as err:  # still down after the retry budget: keep the batches, keep trying
                print(f"[{self.spec.adapter_name}] warning: {err}; {len(self._queue)} metric batches queued",
                      flush=True)  # fmt: skip
                time.sleep(1.0)
                continue
            except Exception as err:  # a real error (the run deleted, a bad value): drop these batches, say so
                if is_transient(err):
                    time.sleep(1.0)
                    continue
                steps = f"{batches[0][0]}-{batches[-1][0]}"
                print(f"[{self.spec.adapter_name}] warning: MLflow refused the metrics of steps {steps}: {err}",
                      flush=True)  # fmt: skip
            with self._changed:
                for _ in batches:
                    self._queue.popleft()
                self._changed.notify_all()

    def checkpoint(self, step: int, folder: Path | None, metrics: dict[str, float]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)


def copy_resume_checkpoint(tmp: Path, who: str) -> Path | None:
    """The Ray Train checkpoint this worker restarts from (after a failure or a resubmission), copied to
    `tmp/resume`; None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    resume = tmp / "resume"
    with checkpoint.as_directory() as folder:
        shutil.copytree(folder, resume)
    print(f"[{who}] resuming from checkpoint {checkpoint.path}", flush=True)
    return resume


def tag_node(tracking_uri: str, run_id: str) -> threading.Thread:
    """Tag the run with this worker's Ray node, on a side thread: an MLflow that is restarting (its client retries
    for minutes) must not hold up training."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()

    def send() -> None:
        from mlflow import MlflowClient

        try:
            MlflowClient(tracking_uri).set_tag(run_id, "ray_node_id", node_id)
        except Exception as err:  # a tag is not worth failing the training for
            print(f"warning: could not tag run {run_id} with its Ray node: {err}", flush=True)

    thread = threading.Thread(target=send, name="mlflow-node-tag", daemon=True)
    thread.start()
    return thread


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from jobs.train_loop import train

    spec = TrialSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    hooks = RayHooks(spec, config["run_id"], config["tracking_uri"], config["experiment"], rank)
    if rank == 0:  # the node this attempt trains on (a retry after a lost node overwrites it): MLflow tag ray_node_id
        tag_node(config["tracking_uri"], config["run_id"])
    device = str(ray.train.torch.get_device())
    cap_memory(config.get("gpus_per_worker", 0.0), device)  # a fractional GPU: stay within this worker's share
    with tempfile.TemporaryDirectory() as tmp:
        resume = copy_resume_checkpoint(Path(tmp), spec.adapter_name)
        wrap = ray.train.torch.prepare_model if world > 1 and spec.deepspeed is None else None
        out = Path(tmp) / "final"
        outcome = train(spec, hooks, out / ADAPTER_DIR, resume, rank, world, device, wrap)
        hooks.close()  # every metric in MLflow before the run is marked finished
        metrics = {"step": outcome.steps, "adapter_score": outcome.adapter_score, "base_score": outcome.base_score}
        if rank == 0:
            record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(outcome).items()}
            (out / OUTCOME_FILE).write_text(json.dumps(record))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
        else:
            ray.train.report(metrics)


def fit_trainer(config: SweepConfig, worker: Any, loop_config: dict[str, Any], name: str, num_workers: int,
                callbacks: list[Any], final_file: str) -> Path:  # fmt: skip
    """Run one TorchTrainer named `name` (stable: a resubmitted sweep resumes from its checkpoints) with the sweep's
    resources and failure policy; return a local copy of its final checkpoint, which must hold `final_file`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = config.resources
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    storage = config.storage_path  # resolved once by the sweep driver (jobs.storage.resolve_storage)
    if not is_uri(storage) and not Path(storage).is_absolute():
        raise ValueError(f"storage_path {storage!r} must be absolute or a URI here: the driver resolves it once "
                         "(jobs.storage.resolve_storage), not each worker in its own directory")  # fmt: skip
    trainer = TorchTrainer(
        worker,
        train_loop_config={
            **loop_config,
            "tracking_uri": config.mlflow.uri(),
            "experiment": config.mlflow.experiment,
            "gpus_per_worker": res.gpus_per_worker,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training {name} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training {name} ended without a final checkpoint")
    local = Path(tempfile.mkdtemp(prefix=f"lorafleet-{name}-"))
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(folder, local, dirs_exist_ok=True)
    if not (local / final_file).exists():
        raise RuntimeError(f"training {name}: the last checkpoint is not a final one")
    return local


def fit_adapter(config: SweepConfig, spec: TrialSpec, run_id: str, callbacks: list[Any]) -> Path:
    """Fit one adapter's TorchTrainer; return a local folder holding `adapter/` and `outcome.json`."""
    return fit_trainer(config, train_worker, {"spec": spec.model_dump(mode="json"), "run_id": run_id},
                       f"{spec.sweep}-{spec.adapter_name}", config.resources.workers_per_adapter, callbacks,
                       OUTCOME_FILE)  # fmt: skip
