"""The sweep config: one YAML file says what to fine-tune, how, where it runs and where it is tracked.

Validated by pydantic (unknown keys refused, every error names its field). `trials()` expands tasks x grid into
one `TrialSpec` per adapter. See jobs/configs/*.yaml for commented examples.

    python -m jobs.config jobs/configs/cpu-smollm2.yaml      # validate and list the trials
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapters.base_models import QuantizationConfig
from adapters.lora_files import PROJECTIONS
from jobs.task_config import TaskConfig, parse_task_entries

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Strict):
    r: int = Field(16, ge=1, le=256)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_rslora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            unknown = sorted(set(value) - set(PROJECTIONS))
            if unknown or not value:
                raise ValueError(f"unknown modules {unknown}; choose from {list(PROJECTIONS)} or 'all-linear'")
        return value

    def modules(self) -> list[str]:
        return list(PROJECTIONS) if self.target_modules == "all-linear" else list(self.target_modules)


class TrainingSettings(_Strict):
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    max_steps: int | None = Field(None, ge=1, description="null (with epochs null) = each task's default length")
    epochs: float | None = Field(None, gt=0, description="passes over the training split; fractions allowed")
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(512, ge=16)
    packing: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    optimizer: Literal["adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="steps between quick evals during training; 0 = only at the end")
    checkpoint_every: int = Field(50, ge=1)
    early_stop_patience: int | None = Field(
        None, ge=1, description="stop after this many quick evals (eval_every) without a lower eval loss; null = never"
    )

    @model_validator(mode="after")
    def _one_length(self) -> TrainingSettings:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set at most one of max_steps and epochs (neither: each task's default length)")
        if self.early_stop_patience is not None and not self.eval_every:
            raise ValueError("early_stop_patience needs eval_every > 0 (early stopping watches the quick evals)")
        return self


class EvaluationSettings(_Strict):
    max_examples: int = Field(100, ge=1, description="eval-split rows scored at the end (base and adapter)")
    quick_examples: int = Field(24, ge=1, description="rows scored at each eval_every during training")
    max_new_tokens: int | None = Field(None, ge=1, description="null = the longest reference answer + 8 tokens")
    batch_size: int = Field(32, ge=1, description="sequences decoded together by the evaluation engine")


class ResourceSettings(_Strict):
    workers_per_adapter: int = Field(1, ge=1, description="DDP workers for one adapter")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0, description="fractional values pack several adapters on one GPU")
    check_cluster: bool = Field(True, description="refuse trials bigger than the cluster (off with an autoscaler)")

    @field_validator("gpus_per_worker")
    @classmethod
    def _fraction_or_whole(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("above 1, GPUs per worker must be a whole number")
        return value

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class MlflowSettings(_Strict):
    tracking_uri: str | None = Field(None, description="null = $MLFLOW_TRACKING_URI or http://127.0.0.1:5000")
    experiment: str = "lorafleet"
    registry_prefix: str = Field("", description="registered model name = prefix + task")
    register_models: bool = True

    def uri(self) -> str:
        """cluster/mlflow_uri.py's rule: this field, $MLFLOW_TRACKING_URI, the running local stack, :5000."""
        from cluster.mlflow_uri import resolve_mlflow_uri

        return resolve_mlflow_uri(self.tracking_uri or None, "http://127.0.0.1:5000") or "http://127.0.0.1:5000"


class DeepSpeedSettings(_Strict):
    stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False


class SweepConfig(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    base_model: str = "smollm2-135m"
    quantization: QuantizationConfig = QuantizationConfig()
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    tasks: dict[str, TaskConfig | Literal["bundled"]] = Field(
        "all",
        validate_default=True,
        description="'all' bundled tasks, a list of bundled names, or name -> task config (jobs/task_config.py)",
    )
    grid: dict[str, list[Any]] = Field({}, description="dotted field -> values; one adapter per combination")
    resources: ResourceSettings = ResourceSettings()
    max_concurrent_trials: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="worker failures survived per adapter (resume from checkpoint)")
    storage_path: str = Field(".lorafleet/runs", description="checkpoints; shared FS or s3:// on a cluster")
    mlflow: MlflowSettings = MlflowSettings()
    deepspeed: DeepSpeedSettings | None = None
    strategy: Literal["solo", "cotrain"] = Field(
        "solo", description="solo: one Ray Train run (and base copy) per adapter; cotrain: see adapters_per_job"
    )
    adapters_per_job: int = Field(8, ge=1, le=256, description="cotrain: adapters trained together over one base")

    @model_validator(mode="after")
    def _cotrain_fits(self) -> SweepConfig:
        if self.strategy == "cotrain":
            if self.resources.workers_per_adapter != 1:
                raise ValueError("resources.workers_per_adapter: strategy cotrain runs each group on one worker")
            if self.deepspeed is not None:
                raise ValueError("deepspeed: not supported with strategy cotrain (use solo for sharded bases)")
        return self

    @model_validator(mode="after")
    def _zero3_fits(self) -> SweepConfig:
        """ZeRO-3 shards the base: a 4-bit base cannot be sharded, and no rank can decode mid-training."""
        if self.deepspeed is not None and self.deepspeed.stage == 3:
            if self.quantization.mode == "nf4":
                raise ValueError("quantization.mode: nf4 cannot be sharded by deepspeed.stage 3 (ZeRO-3); use "
                                 "mode none with ZeRO-3, or nf4 with deepspeed.stage 2 or no deepspeed")  # fmt: skip
            if self.training.eval_every:
                raise ValueError("training.eval_every: quick evals need the whole model on one rank, which "
                                 "deepspeed.stage 3 never holds; set 0 (the final evaluation runs on a fresh "
                                 "unsharded copy of the base)")  # fmt: skip
            for name, task in self.tasks.items():
                if task != "bundled" and not task.metric.generates:
                    raise ValueError(f"tasks.{name}.metric: eval_loss needs the whole model on one rank, which "
                                     "deepspeed.stage 3 never holds; use a generating metric or deepspeed.stage 2")  # fmt: skip
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_data_section(cls, values: Any) -> Any:
        if isinstance(values, dict) and "data" in values:
            raise ValueError("data: removed; declare each task's files in `tasks:` instead, e.g. tasks: "
                             "{my_task: {train: train.jsonl, eval: eval.jsonl, metric: exact_match}}")  # fmt: skip
        return values

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_entries(cls, value: Any) -> Any:
        return parse_task_entries(value)

    @model_validator(mode="after")
    def _grid(self) -> SweepConfig:
        for key, values in self.grid.items():
            section, _, field = key.partition(".")
            if section not in ("lora", "training", "quantization", "evaluation") or not field:
                raise ValueError(f"grid key '{key}': use lora.<field>, training.<field> or quantization.<field>")
            if field not in type(getattr(self, section)).model_fields:
                raise ValueError(f"grid key '{key}': {section} has no field '{field}'")
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid key '{key}': give a non-empty list of values")
        if self.grid:  # every combination must itself be valid (apply() clears the grid, so this terminates)
            for point in self.grid_points():
                self.apply(point)
        return self

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def task_configs(self) -> dict[str, TaskConfig]:
        """Every task as a TaskConfig (bundled ones from jobs.tasks), in declaration order."""
        from jobs.tasks import bundled_task_config

        return {name: bundled_task_config(name) if entry == "bundled" else entry for name, entry in self.tasks.items()}

    def with_paths_from(self, base_dir: Path) -> SweepConfig:
        """This config with relative data paths of user tasks made absolute against `base_dir` (where they exist)."""
        tasks: dict[str, Any] = {}
        for name, entry in self.tasks.items():
            if entry == "bundled":
                tasks[name] = entry
                continue
            update = {}
            for key in ("train", "eval"):
                value = getattr(entry, key)
                if value and "://" not in value and not Path(value).is_absolute() and (base_dir / value).exists():
                    update[key] = str((base_dir / value).resolve())
            tasks[name] = entry.model_copy(update=update)
        return self.model_copy(update={"tasks": tasks})

    def grid_points(self) -> list[dict[str, Any]]:
        keys = sorted(self.grid)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.grid[k] for k in keys))]

    def apply(self, point: dict[str, Any]) -> SweepConfig:
        """This config with one grid point's values set (validated: errors name the grid key)."""
        data = self.model_dump()
        for key, value in point.items():
            section, _, field = key.partition(".")
            data[section][field] = value
        data["grid"] = {}
        try:
            return SweepConfig.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(f"grid point {point}: {field_path(first['loc'])}: {first['msg']}") from None

    def trials(self) -> list[TrialSpec]:
        specs = []
        for point in self.grid_points():
            applied = self.apply(point)
            for task in self.task_names():
                specs.append(TrialSpec.build(applied, task, point))
        return specs

    def groups(self) -> list[list[TrialSpec]]:
        """cotrain: the trials in groups of at most `adapters_per_job` that can share one base (same quantization
        and gradient checkpointing), in trial order; solo: one trial per group."""
        if self.strategy == "solo":
            return [[t] for t in self.trials()]
        by_key: dict[str, list[TrialSpec]] = {}
        for trial in self.trials():
            key = json.dumps([trial.quantization.model_dump(mode="json"), trial.training.gradient_checkpointing])
            by_key.setdefault(key, []).append(trial)
        k = self.adapters_per_job
        return [members[i : i + k] for members in by_key.values() for i in range(0, len(members), k)]


class TrialSpec(_Strict):
    """Everything one adapter's training needs; plain data, so it travels to Ray workers."""

    sweep: str
    task: str
    adapter_name: str  # unique in the sweep: <task> or <task>-<point id>
    point: dict[str, Any]
    point_id: str
    base_model: str
    quantization: QuantizationConfig
    lora: LoraSettings
    training: TrainingSettings
    evaluation: EvaluationSettings
    task_config: TaskConfig
    bundled: bool  # one of jobs.tasks' bundled tasks (its committed splits, prompt and metric)
    deepspeed: DeepSpeedSettings | None
    registered_model: str

    @classmethod
    def build(cls, config: SweepConfig, task: str, point: dict[str, Any]) -> TrialSpec:
        from jobs.training_length import default_length

        point_id = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = task if not point else f"{task}-{point_id}"
        bundled = config.tasks[task] == "bundled"
        training = config.training
        if training.max_steps is None and training.epochs is None:
            training = training.model_copy(update=default_length(bundled))
        return cls(sweep=config.name, task=task, adapter_name=name, point=point, point_id=point_id,
                   base_model=config.base_model, quantization=config.quantization, lora=config.lora,
                   training=training, evaluation=config.evaluation, task_config=_portable(config, task),
                   bundled=bundled, deepspeed=config.deepspeed,
                   registered_model=f"{config.mlflow.registry_prefix}{task}")  # fmt: skip


def _portable(config: SweepConfig, task: str) -> TaskConfig:
    """The task config a trial carries: a bundled task's files named relative to the package root (they are package
    data, found again on whichever node trains it: jobs.task_runtime.task_config_of), so the trial's params do not
    depend on where the driver's copy of the code lives."""
    resolved = config.task_configs()[task]
    if config.tasks[task] != "bundled":
        return resolved
    root = Path(__file__).resolve().parents[1]
    return resolved.model_copy(update={k: str(Path(getattr(resolved, k)).relative_to(root)) for k in ("train", "eval")})


def field_path(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the dotted field a user wrote (union branch labels such as
    `function-after[...]` or `literal['bundled']` left out)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or "(" in p))]
    return ".".join(parts) or "(top level)"


class ConfigError(ValueError):
    """A sweep config that cannot run; the message is one line naming the field."""


def load_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = field_path(first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {where}: {msg}") from None


def load_config_or_exit(path: str | Path) -> SweepConfig:
    """`load_config` for command-line entry points: a bad config exits with its one-line error."""
    try:
        return load_config(path)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description="Validate a sweep config and list its trials.")
    parser.add_argument("config")
    args = parser.parse_args()
    config = load_config_or_exit(args.config)
    for number, group in enumerate(config.groups(), 1):
        if config.strategy == "cotrain":
            print(f"co-training group {number} ({len(group)} adapters over one base):")
        for trial in group:
            print(f"{trial.adapter_name:32s} task={trial.task:20s} point={trial.point}")


if __name__ == "__main__":
    main()
