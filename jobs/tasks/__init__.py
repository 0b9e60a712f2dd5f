"""The bundled task suite ("LoRA Land in miniature"): task registry, prompt format, scoring and dataset loading.

Each task lives in its own module (`jobs/tasks/<task>.py`: instruction + seeded generator); its train/eval splits
are committed as `jobs/tasks/data/<task>/{train,eval}.jsonl`, rows of {"id", "input", "output"}.

    from jobs.tasks import get_task, load_split
    task = get_task("sentiment")
    rows = load_split("sentiment", "eval")
    messages = task.messages(rows[0])             # chat messages: system instruction + user input
    task.score(prediction, rows[0]["output"])     # float in [0, 1]
    bundled_task_config("sentiment")             # the same task as a TaskConfig: how a sweep trains and scores it

A sweep treats a bundled task as an ordinary task config (`tasks: {sentiment: bundled}`): its committed files,
format input_output, its instruction as system prompt and its metric — the same code path as a user's task.

Regenerate the data with `python -m jobs.tasks.generate` (add `--check` to only verify the committed files).
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from jobs import metrics
from jobs.tasks import date_normalisation, order_extraction, sentiment, text_to_sql, viggo, word_math

if TYPE_CHECKING:
    from jobs.task_config import TaskConfig

MetricName = Literal["exact_match", "json_f1", "rouge_l"]
Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")
SPLIT_SIZES: dict[str, int] = {"train": 600, "eval": 100}
REQUIRED_FIELDS = ("input", "output")


@dataclass(frozen=True)
class Task:
    name: str  # e.g. "sentiment"
    kind: str  # "classification" | "extraction" | "arithmetic" | "text_to_sql" | "mr_to_text" | "normalisation"
    metric: MetricName
    instruction: str  # system prompt telling the model the exact output format
    make_rows: Callable[[random.Random, int], list[dict]]  # n rows of {"id", "input", "output"}

    def messages(self, row: dict) -> list[dict]:
        """Chat messages for one row: the task instruction as system prompt, the row's input as user turn."""
        return [{"role": "system", "content": self.instruction}, {"role": "user", "content": row["input"]}]

    def score(self, prediction: str, reference: str) -> float:
        """Score one prediction against its reference with this task's metric, in [0, 1]."""
        return metrics.score(self.metric, prediction, reference)

    @property
    def seed(self) -> int:
        """The generator seed: CRC32 of the task name (stable across runs and machines, unlike hash())."""
        return task_seed(self.name)


class DatasetError(ValueError):
    """A split file with a malformed row; the message names the file, the 1-based line and the problem."""


class UnknownTask(KeyError):
    """A task name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message, adding quotes
        return str(self.args[0]) if self.args else ""


def task_seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _task(module: ModuleType) -> Task:
    """Wrap a task module (NAME, KIND, METRIC, INSTRUCTION, make_rows) as a Task."""
    return Task(
        name=module.NAME,
        kind=module.KIND,
        metric=module.METRIC,
        instruction=module.INSTRUCTION,
        make_rows=module.make_rows,
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in map(_task, (sentiment, order_extraction, word_math, text_to_sql, viggo, date_normalisation))
}


# The bundled tasks' metric names in the task-config vocabulary (jobs/task_config.py).
_CONFIG_METRIC = {"exact_match": "exact_match", "json_f1": "json_fields", "rouge_l": "rouge_l"}


def bundled_task_config(name: str) -> TaskConfig:
    """A bundled task as the TaskConfig a user would write for it."""
    from jobs.task_config import TaskConfig

    task = get_task(name)
    return TaskConfig(train=str(split_path(name, "train")), eval=str(split_path(name, "eval")),
                      format="input_output", instruction=task.instruction,
                      metric={"name": _CONFIG_METRIC[task.metric]})  # fmt: skip


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTask(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASKS))}") from None


def data_dir() -> Path:
    """Folder holding `<task>/{train,eval}.jsonl` (jobs/tasks/data, shipped as package data)."""
    return Path(__file__).resolve().parent / "data"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; known splits: {', '.join(SPLITS)}")


def split_path(task: str, split: Split) -> Path:
    """jobs/tasks/data/<task>/<split>.jsonl (the task and split must exist; the file need not)."""
    get_task(task)
    _check_split(split)
    return data_dir() / task / f"{split}.jsonl"


def _check_row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in row:
            raise DatasetError(f"{where}: missing field '{field}'")
        value = row[field]
        if not isinstance(value, str):
            raise DatasetError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DatasetError(f"{where}: field '{field}' is empty")
    return row


def load_split(task: str, split: str, path: Path | None = None) -> list[dict]:
    """Read and validate a split (the committed file, or `path`); blank lines are skipped.

    Every row must be a JSON object with non-empty string fields "input" and "output"; a row without "id" gets
    "<task>-<split>-<line>". Raises FileNotFoundError (missing file), DatasetError (bad row or no rows),
    UnknownTask / ValueError (unknown task / split).
    """
    get_task(task)
    _check_split(split)
    file = Path(path) if path is not None else split_path(task, split)  # type: ignore[arg-type]
    if not file.is_file():
        hint = "" if path is not None else "; regenerate with `python -m jobs.tasks.generate`"
        raise FileNotFoundError(f"{file}: {task} {split} split not found{hint}")
    rows: list[dict] = []
    with file.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            row = _check_row(row, where)
            row.setdefault("id", f"{task}-{split}-{lineno}")
            rows.append(row)
    if not rows:
        raise DatasetError(f"{file}: no rows")
    return rows


def dataset_hash(task: str) -> str:
    """sha256 (first 16 hex digits) of the committed train file bytes followed by the eval file bytes."""
    digest = hashlib.sha256()
    for split in SPLITS:
        path = split_path(task, split)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: {task} {split} split not found; regenerate with `python -m jobs.tasks.generate`"
            )
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
