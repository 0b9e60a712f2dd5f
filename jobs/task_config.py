"""What a task is: configuration, not code — where its data lives, what format its rows have, the prompt it is
trained and served with, and the metric that scores it.

A sweep config declares tasks by name (see jobs/configs/my-tasks.yaml for a commented example):

    tasks:
      ticket_triage:
        train: data/triage_train.jsonl   # JSONL/JSON/CSV/Parquet/Arrow file or folder, saved dataset, HF id, s3://, gs://
        eval_fraction: 0.1               # or eval: data/triage_eval.jsonl
        format: auto                     # auto | input_output | prompt_completion | messages | alpaca | text
        columns: {input: question, output: answer}
        instruction: "Route the ticket to one team."
        metric: {name: choice, labels: [billing, bug, account]}
      sentiment: bundled                 # the bundled tasks are ordinary entries of the same mechanism

Relative data paths are relative to the directory the command runs in: the repository root for `lorafleet data
check` and `python -m jobs...`, the job's working dir (the uploaded repository) under `ray job submit`.
Validated with pydantic (unknown keys refused); `python -m jobs.task_config CONFIG` prints each task's resolved form.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DatasetFormat = Literal["auto", "input_output", "prompt_completion", "messages", "alpaca", "text"]
MetricName = Literal["exact_match", "choice", "json_fields", "rouge_l", "numeric", "regex", "eval_loss"]
# The canonical fields of each format; `columns` maps them to other column names in the user's files.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "input_output": ("input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "alpaca": ("instruction", "input", "output"),
    "text": ("text",),
}
CANONICAL_FIELDS = tuple(sorted({f for fields in FORMAT_FIELDS.values() for f in fields} | {"id"}))
TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricConfig(_Strict):
    """How a task is scored (0-100, higher is better; `eval_loss` is reported as is, lower is better).

    exact_match: normalised string equality. choice: accuracy (the score) and macro-F1 over `labels`.
    json_fields: F1 over (key, value) pairs of a JSON object (only `fields` if given). rouge_l: ROUGE-L F1.
    numeric: the first number in the prediction within `tolerance` (relative to max(1, |reference|)).
    regex: `pattern` extracts the answer (group 1 if it has groups) from prediction and reference, then exact match.
    eval_loss: no generation; the mean completion-token loss on the eval split."""

    name: MetricName = "exact_match"
    labels: list[str] | None = Field(None, description="choice: the label set (default: the eval split's labels)")
    fields: list[str] | None = Field(None, description="json_fields: keys to score (default: the reference's)")
    tolerance: float = Field(1e-6, ge=0, description="numeric: allowed relative difference")
    pattern: str | None = Field(None, description="regex: extracts the answer from a text")

    @model_validator(mode="after")
    def _options_fit(self) -> MetricConfig:
        if self.labels is not None and self.name != "choice":
            raise ValueError("labels: only for metric choice")
        if self.labels is not None and len(set(self.labels)) < 2:
            raise ValueError("labels: a choice needs at least two distinct labels")
        if self.fields is not None and self.name != "json_fields":
            raise ValueError("fields: only for metric json_fields")
        if self.name == "regex":
            if not self.pattern:
                raise ValueError("pattern: metric regex needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern: not a valid regular expression ({err})") from None
        elif self.pattern is not None:
            raise ValueError("pattern: only for metric regex")
        return self

    @property
    def generates(self) -> bool:
        """False for `eval_loss` (scored from the loss, nothing is decoded)."""
        return self.name != "eval_loss"


class TaskConfig(_Strict):
    """One task: its data, format, prompt and metric."""

    train: str = Field(description="file, folder, saved dataset, HF dataset id, s3:// or gs:// URI")
    eval: str | None = Field(None, description="the held-out split (same kinds as train); or eval_fraction")
    eval_fraction: float | None = Field(None, gt=0, le=0.5, description="hold out this share of train (seeded)")
    split_seed: int = Field(0, description="seed of the eval_fraction split")
    subset: str | None = Field(None, description="HF dataset config name (hub datasets with several configs)")
    train_split: str = Field("train", description="split name inside a hub or saved dataset")
    eval_split: str | None = Field(None, description="split name for eval inside the same dataset as train")
    format: DatasetFormat = "auto"
    columns: dict[str, str] = Field({}, description="canonical field -> column name in the files")
    instruction: str | None = Field(None, description="system prompt added to every example (and served with it)")
    metric: MetricConfig = MetricConfig()
    overlength: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="rows longer than training.max_seq_len: cut, leave out, or stop with an error"
    )
    max_rows: int | None = Field(None, ge=1, description="use only the first N training rows (after the split)")

    @field_validator("metric", mode="before")
    @classmethod
    def _metric_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for field, column in value.items():
            if field not in CANONICAL_FIELDS:
                raise ValueError(f"unknown field '{field}'; map one of {', '.join(CANONICAL_FIELDS)} to a column")
            if not isinstance(column, str) or not column:
                raise ValueError(f"{field}: give the column name as a non-empty string")
        return value

    @model_validator(mode="after")
    def _one_eval(self) -> TaskConfig:
        sources = (self.eval is not None) + (self.eval_fraction is not None) + (self.eval_split is not None)
        if sources != 1:
            raise ValueError("eval: set exactly one of eval (a path), eval_fraction or eval_split")
        if self.format == "text" and self.metric.generates:
            raise ValueError("metric: format text has no reference answers to compare; use metric eval_loss")
        return self


def parse_task_entries(value: Any) -> dict[str, TaskConfig | Literal["bundled"]]:
    """Normalise the sweep's `tasks` value: `all`, a list of bundled names, or a mapping name -> config|bundled."""
    from jobs.tasks import TASKS

    if value == "all":
        return dict.fromkeys(sorted(TASKS), "bundled")
    if isinstance(value, list):
        if not value:
            raise ValueError("list at least one task")
        entries: dict[str, Any] = {}
        for i, name in enumerate(value):
            if not isinstance(name, str) or name not in TASKS:
                raise ValueError(
                    f"unknown task '{name}' (item {i}); bundled tasks: {', '.join(sorted(TASKS))}; declare your "
                    f"own as a mapping: tasks: {{{name}: {{train: ..., eval: ..., metric: ...}}}}"
                )
            entries[name] = "bundled"
        return entries
    if isinstance(value, dict):
        if not value:
            raise ValueError("declare at least one task")
        out: dict[str, Any] = {}
        for name, entry in value.items():
            if not isinstance(name, str) or not re.match(TASK_NAME_PATTERN, name):
                raise ValueError(f"task name '{name}': use letters, digits, '.', '_' or '-' (at most 64)")
            if entry == "bundled":
                if name not in TASKS:
                    raise ValueError(f"{name}: not a bundled task ({', '.join(sorted(TASKS))})")
                out[name] = "bundled"
            elif isinstance(entry, dict | TaskConfig):
                if name in TASKS:  # its registered model and champion alias belong to the bundled task
                    raise ValueError(f"{name}: the name of a bundled task; give your task another name, or write "
                                     f"'{name}: bundled' for the bundled one")  # fmt: skip
                out[name] = entry
            else:
                raise ValueError(f"{name}: give a mapping (train, eval, format, metric, ...) or 'bundled'")
        return out
    raise ValueError("give 'all', a list of bundled task names, or a mapping of task name -> task config")


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the resolved task configs of a sweep config.")
    parser.add_argument("config")
    args = parser.parse_args()
    from jobs.config import load_config_or_exit

    for name, task in load_config_or_exit(args.config).task_configs().items():
        print(f"{name}: {task.model_dump_json(exclude_defaults=True)}")


if __name__ == "__main__":
    main()
