"""Sweep configs: every shipped config validates, the grid expands, and each bad input is one line naming the
field — before anything trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.config import ConfigError, SweepConfig, load_config
from jobs.preflight import PreflightError, check_base_model, check_datasets, check_resources
from jobs.sweep import apply_overrides
from jobs.tasks import TASKS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    config = load_config(path)
    trials = config.trials()
    assert trials and len({t.adapter_name for t in trials}) == len(trials)


def test_cpu_config_trains_one_adapter_per_bundled_task() -> None:
    config = load_config(Path(CONFIGS[0]).parent / "cpu-smollm2.yaml")
    assert config.base_model == "smollm2-135m"
    assert sorted(t.task for t in config.trials()) == sorted(TASKS)


def test_grid_expands_tasks_times_points(tmp_path: Path) -> None:
    config = SweepConfig(name="g", tasks=["sentiment", "viggo"],
                         grid={"lora.r": [4, 8], "training.learning_rate": [1e-4, 3e-4, 1e-3]})  # fmt: skip
    trials = config.trials()
    assert len(trials) == 12
    assert {(t.lora.r, t.training.learning_rate) for t in trials if t.task == "viggo"} == {
        (r, lr) for r in (4, 8) for lr in (1e-4, 3e-4, 1e-3)
    }
    assert all(t.adapter_name.startswith(t.task + "-") for t in trials)
    assert {t.registered_model for t in trials} == {"sentiment", "viggo"}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (
            {"name": "x", "tasks": ["sentiment", "poetry"]},
            "tasks: unknown task 'poetry' (item 1); bundled tasks: date_normalisation",
        ),
        ({"name": "x", "data": {"sentiment": {"train": "a", "eval": "b"}}}, "data: removed; declare each task"),
        (
            {"name": "x", "tasks": {"sentiment": {"train": "a.jsonl", "eval": "b.jsonl"}}},
            "sentiment: the name of a bundled task",
        ),
        ({"name": "x", "tasks": {"mine": {"train": "a.jsonl"}}}, "set exactly one of eval (a path), eval_fraction"),
        (
            {"name": "x", "tasks": {"mine": {"train": "a.jsonl", "eval": "b", "eval_fraction": 0.1}}},
            "set exactly one of eval",
        ),
        ({"name": "x", "tasks": {"mine": {"train": "a", "eval_fraction": 0.1, "format": "csv"}}}, "tasks.mine.format"),
        (
            {"name": "x", "tasks": {"mine": {"train": "a", "eval_fraction": 0.1, "columns": {"question": "q"}}}},
            "unknown field 'question'",
        ),
        (
            {
                "name": "x",
                "tasks": {
                    "mine": {"train": "a", "eval_fraction": 0.1, "metric": {"name": "choice", "labels": ["a", "a"]}}
                },
            },
            "at least two distinct labels",
        ),
        (
            {"name": "x", "tasks": {"mine": {"train": "a", "eval_fraction": 0.1, "metric": "regex"}}},
            "metric regex needs a pattern",
        ),
        (
            {"name": "x", "tasks": {"mine": {"train": "a", "eval_fraction": 0.1, "metric": "bleu"}}},
            "tasks.mine.metric.name",
        ),
        (
            {"name": "x", "tasks": {"mine": {"train": "a", "eval_fraction": 0.1, "format": "text"}}},
            "format text has no reference answers",
        ),
        ({"name": "x", "tasks": {"bad name": {"train": "a", "eval_fraction": 0.1}}}, "task name 'bad name'"),
        (
            {
                "name": "x",
                "deepspeed": {"stage": 3},
                "tasks": {"mine": {"train": "a", "eval_fraction": 0.1, "format": "text", "metric": "eval_loss"}},
            },
            "tasks.mine.metric: eval_loss needs the whole model on one rank",
        ),
        (
            {"name": "x", "tasks": {"mine": {"train": "a", "eval_fraction": 0.1, "epochs": 2}}},
            "tasks.mine.epochs: Extra inputs are not permitted",
        ),
        ({"name": "x", "lora": {"r": 0}}, "lora.r: Input should be greater than or equal to 1"),
        ({"name": "x", "lora": {"rank": 8}}, "lora.rank: Extra inputs are not permitted"),
        ({"name": "x", "training": {"max_steps": 5, "epochs": 1}}, "set at most one of max_steps and epochs"),
        ({"name": "x", "lora": {"target_modules": ["q_proj", "lm_head"]}}, "unknown modules ['lm_head']"),
        ({"name": "x", "grid": {"lora.rank": [8]}}, "grid key 'lora.rank': lora has no field 'rank'"),
        ({"name": "x", "grid": {"lora.r": [8, -1]}}, "lora.r"),
        ({"name": "x", "resources": {"gpus_per_worker": 1.5}}, "above 1, GPUs per worker must be a whole number"),
        ({"name": "bad name!"}, "name: String should match pattern"),
        ({"name": "x", "quantization": {"mode": "int3"}}, "quantization.mode"),
    ],
)
def test_bad_configs_name_the_field(tmp_path: Path, data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_overrides_use_grid_syntax() -> None:
    config = SweepConfig(name="o", tasks=["sentiment"])
    assert apply_overrides(config, ["training.max_steps=7", "lora.r=4"]).training.max_steps == 7
    with pytest.raises(ConfigError, match="training has no field 'steps'"):
        apply_overrides(config, ["training.steps=7"])


def test_preflight_refuses_missing_data_bad_rows_unknown_base_and_impossible_resources(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"input": "a", "output": "b"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "only input"}\n')

    def mine(**task: str) -> SweepConfig:
        return SweepConfig(name="p", base_model="tiny-llama", tasks={"mine": {"format": "input_output", **task}})

    with pytest.raises(PreflightError, match="tasks.mine: .*nope.jsonl"):
        check_datasets(mine(train=str(tmp_path / "nope.jsonl"), eval=str(good)))
    with pytest.raises(PreflightError, match=r"tasks.mine: .*bad.jsonl:2.*'output'"):
        check_datasets(mine(train=str(bad), eval=str(good)))
    assert set(check_datasets(mine(train=str(good), eval=str(good)))) == {"mine"}
    with pytest.raises(PreflightError, match="base_model: .*no-such"):
        check_base_model(SweepConfig(name="p", base_model="nobody/no-such-model"))
    with pytest.raises(PreflightError, match="needs 8 CPUs .* the cluster has 4"):
        check_resources(SweepConfig(name="p", resources={"workers_per_adapter": 2, "cpus_per_worker": 4}), {"CPU": 4})
    with pytest.raises(PreflightError, match="needs 1 GPUs"):
        check_resources(SweepConfig(name="p", resources={"gpus_per_worker": 1}), {"CPU": 4})
    with pytest.raises(PreflightError, match="paged_adamw_32bit needs GPUs"):
        check_resources(SweepConfig(name="p", training={"optimizer": "paged_adamw_32bit"}), {"CPU": 4})
