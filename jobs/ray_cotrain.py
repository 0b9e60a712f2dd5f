"""The Ray Train layer for one co-training group (`strategy: cotrain`): `cotrain_worker` is the TorchTrainer's
function (one worker: the group shares one base copy on one device), `fit_group` builds and fits that trainer,
with checkpoints in the run's storage and `FailureConfig(max_failures)` resuming every adapter of the group from
the latest group checkpoint. The training itself is `jobs.cotrain_loop.cotrain`, plain Python. Each adapter
logs to its own MLflow run through the same `RayHooks` a solo run uses.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs.config import SweepConfig, TrialSpec
from jobs.gpu_share import cap_memory
from jobs.ray_train import RayHooks, copy_resume_checkpoint, fit_trainer

OUTCOMES_FILE = "outcomes.json"


def group_id(specs: list[TrialSpec]) -> str:
    """Stable for a group's membership, so a resubmitted sweep finds the group's checkpoints."""
    return hashlib.sha256(",".join(sorted(s.adapter_name for s in specs)).encode()).hexdigest()[:8]


class GroupRayHooks:
    """Per-adapter metrics to each adapter's MLflow run; group checkpoints to Ray Train storage."""

    def __init__(self, specs: list[TrialSpec], run_ids: dict[str, str], tracking_uri: str, experiment: str) -> None:
        self._hooks = {s.adapter_name: RayHooks(s, run_ids[s.adapter_name], tracking_uri, experiment, 0)
                       for s in specs}  # fmt: skip

    def log(self, adapter: str, step: int, metrics: dict[str, float]) -> None:
        self._hooks[adapter].log(step, metrics)

    def close(self) -> bool:
        """Wait until every adapter's queued metrics reached MLflow (see `RayHooks.close`)."""
        return all([hooks.close() for hooks in self._hooks.values()])

    def checkpoint(self, round_index: int, folder: Path | None, metrics: dict[str, float]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report({**metrics, "round": round_index}, checkpoint=checkpoint)


def cotrain_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from jobs.cotrain_loop import cotrain

    specs = [TrialSpec.model_validate(s) for s in config["specs"]]
    device = str(ray.train.torch.get_device())
    cap_memory(config.get("gpus_per_worker", 0.0), device)  # a fractional GPU: stay within this worker's share
    hooks = GroupRayHooks(specs, config["run_ids"], config["tracking_uri"], config["experiment"])
    with tempfile.TemporaryDirectory() as tmp:
        resume = copy_resume_checkpoint(Path(tmp), f"group {group_id(specs)}, {len(specs)} adapters")
        if resume is not None and (resume / OUTCOMES_FILE).exists():  # the group had finished: hand results back
            ray.train.report({"finished": 1}, checkpoint=ray.train.Checkpoint.from_directory(str(resume)))
            return
        out = Path(tmp) / "final"
        outcomes = cotrain(specs, hooks, out, resume, device)
        hooks.close()  # every adapter's metrics in MLflow before its run is marked finished
        records = {name: {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()}
                   for name, o in outcomes.items()}  # fmt: skip
        (out / OUTCOMES_FILE).write_text(json.dumps(records))
        ray.train.report({"finished": 1}, checkpoint=ray.train.Checkpoint.from_directory(str(out)))


def fit_group(config: SweepConfig, specs: list[TrialSpec], run_ids: dict[str, str], name: str,
              callbacks: list[Any]) -> Path:  # fmt: skip
    """Fit one group's TorchTrainer (one worker); return a local folder with `<adapter_name>/` per adapter and
    outcomes.json."""
    loop_config = {"specs": [s.model_dump(mode="json") for s in specs], "run_ids": run_ids}
    return fit_trainer(config, cotrain_worker, loop_config, name, 1, callbacks, OUTCOMES_FILE)
