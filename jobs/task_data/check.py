"""Look at a task's data before spending compute: rows, format, token lengths, labels, duplicates, one example.

`check_task` loads a task and returns a `TaskReport`: rows per split, the detected format, token length p50/p95/max
of the training rows and how many exceed max_seq_len, label balance (metric choice), reference checks of the metric,
duplicate inputs in train and train/eval overlap, and the first training example rendered exactly as the model sees
it with the trained-on part marked. `errors` stop a sweep (preflight); `warnings` are worth reading.

    python -m jobs.task_data.check jobs/configs/my-tasks.yaml [--task ticket_triage]   # = lorafleet data check
Exit status: 0 when no task has an error, 1 otherwise, 2 for a config that does not load.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from jobs.data import encode_example, encode_examples, eval_prompt_ids, render_example
from jobs.task_config import TaskConfig
from jobs.task_data.errors import DatasetError
from jobs.task_data.example import Example, TaskData
from jobs.task_data.load import load_task
from jobs.task_data.render import CLOSE, OPEN, format_runs, marked_runs

MAX_NAMED = 3  # rows named per finding


@dataclass
class TaskReport:
    name: str
    max_seq_len: int
    overlength: str
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows
    format: str = ""
    format_note: str = ""
    fingerprint: str = ""
    tokens: dict[str, int] = field(default_factory=dict)  # p50 / p95 / max tokens of a training row (before cuts)
    over_max: int = 0  # training rows longer than max_seq_len
    label_balance: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> label -> rows (choice)
    duplicates: int = 0  # training rows whose input repeats an earlier training row's
    overlap: int = 0  # eval rows whose input is also a training row's
    example_where: str = ""
    example: list[tuple[str, bool]] = field(default_factory=list)  # (text, trained) runs
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _named(wheres: list[str]) -> str:
    return ", ".join(wheres[:MAX_NAMED]) + (" ..." if len(wheres) > MAX_NAMED else "")


def _lengths(report: TaskReport, data: TaskData, task: TaskConfig, tokenizer: Any) -> None:
    rendered = [render_example(tokenizer, e) for e in data.train]
    lengths = [len(full.input_ids) for full, _ in rendered]
    report.tokens = {"p50": percentile(lengths, 0.5), "p95": percentile(lengths, 0.95), "max": max(lengths)}
    over = [e.where for e, n in zip(data.train, lengths, strict=True) if n > report.max_seq_len]
    report.over_max = len(over)
    fallbacks = sum(fallback for _, fallback in rendered)
    if fallbacks:
        report.warnings.append(f"the chat template rewrites earlier turns: {fallbacks} multi-turn rows train on their "
                               "last answer only")  # fmt: skip
    if over:
        what = f"{len(over)} of {len(lengths)} train rows are longer than max_seq_len={report.max_seq_len} ({_named(over)})"
        if task.overlength == "error":
            report.errors.append(f"{what}; overlength: error stops the run (use truncate or drop, or raise it)")
        else:
            try:
                _, stats = encode_examples(tokenizer, data.train, report.max_seq_len, task.overlength)
            except DatasetError as err:  # nothing fits
                report.errors.append(f"{what}: {err}")
                return
            fate = "cut from the end" if task.overlength == "truncate" else "left out"
            lost = (
                f", {stats.dropped} left out (nothing to learn fits)"
                if task.overlength == "truncate" and stats.dropped
                else ""
            )
            report.warnings.append(f"{what}: they are {fate} (overlength: {task.overlength}){lost}")
    long_prompts = [e.where for e in data.eval if len(eval_prompt_ids(tokenizer, e)) >= report.max_seq_len]
    if long_prompts:
        report.warnings.append(f"{len(long_prompts)} eval prompts fill max_seq_len={report.max_seq_len} and leave no "
                               f"room for an answer ({_named(long_prompts)})")  # fmt: skip


def _metric(report: TaskReport, data: TaskData, task: TaskConfig) -> None:
    from jobs.metrics import check_references, label_balance

    if not task.metric.generates:
        return
    splits = {"eval": data.eval} if task.metric.name != "choice" else {"train": data.train, "eval": data.eval}
    for split, examples in splits.items():
        references = [e.reference for e in examples]
        for line in check_references(task.metric, references):
            warning = line.startswith("warning: ")
            (report.warnings if warning else report.errors).append(
                f"{split} references: {line.removeprefix('warning: ')}"
            )
        if task.metric.name == "choice":
            report.label_balance[split] = label_balance(task.metric, references)


def _repeats(report: TaskReport, data: TaskData) -> None:
    first: dict[str, str] = {}
    repeated: list[str] = []
    for example in data.train:
        key = example.input_key()
        if key in first:
            repeated.append(f"{example.where} = {first[key]}")
        else:
            first[key] = example.where
    report.duplicates = len(repeated)
    if repeated:
        report.warnings.append(f"{len(repeated)} train rows repeat an earlier row's input ({_named(repeated)})")
    shared = [f"{e.where} = {first[e.input_key()]}" for e in data.eval if e.input_key() in first]
    report.overlap = len(shared)
    if shared:
        report.warnings.append(f"{len(shared)} eval rows also appear in train, which inflates the eval score "
                               f"({_named(shared)})")  # fmt: skip


def _example(report: TaskReport, example: Example, tokenizer: Any) -> None:
    encoded = encode_example(tokenizer, example, report.max_seq_len, "truncate")
    if encoded is not None:
        report.example_where = example.where
        report.example = marked_runs(tokenizer, encoded)


def check_task(
    name: str, task: TaskConfig, tokenizer: Any, max_seq_len: int, base_dir: Path | None = None
) -> TaskReport:
    """Load and inspect one task (see the module docstring); problems go to `errors` / `warnings`, never raise."""
    report = TaskReport(name=name, max_seq_len=max_seq_len, overlength=task.overlength)
    try:
        data = load_task(name, task, base_dir)
    except DatasetError as err:
        report.errors.append(str(err))
        return report
    report.rows = {"train": len(data.train), "eval": len(data.eval)}
    report.format, report.format_note, report.fingerprint = data.format, data.format_note, data.fingerprint
    try:
        _lengths(report, data, task, tokenizer)
        _example(report, data.train[0], tokenizer)
    except Exception as err:  # a chat template that refuses these messages, for one
        report.errors.append(f"task {name}: cannot render the rows with the base model's tokenizer: {err}")
    _metric(report, data, task)
    _repeats(report, data)
    return report


def print_report(report: TaskReport, out: TextIO | None = None, color: bool | None = None) -> None:
    """The report as text; `color` (default: out is a terminal) marks the trained part in green instead of ⟦ ⟧."""
    out = out or sys.stdout
    color = out.isatty() if color is None else color

    def write(line: str = "") -> None:
        print(line, file=out)

    write(f"task {report.name}: {'ok' if report.ok else 'FAILED'}")
    if report.rows:
        write(f"  rows: train {report.rows['train']}, eval {report.rows['eval']}")
        write(f"  format: {report.format_note}")
        write(f"  fingerprint: {report.fingerprint}")
    if report.tokens:
        t = report.tokens
        write(f"  tokens per train row: p50 {t['p50']}, p95 {t['p95']}, max {t['max']}; "
              f"{report.over_max} over max_seq_len={report.max_seq_len} (overlength: {report.overlength})")  # fmt: skip
    for split, counts in report.label_balance.items():
        write(f"  labels ({split}): " + ", ".join(f"{label} {n}" for label, n in counts.items()))
    if report.rows:
        write(f"  duplicate inputs in train: {report.duplicates}; eval rows also in train: {report.overlap}")
    if report.example:
        marker = "green" if color else f"{OPEN} {CLOSE}"
        write(f"  example {_as_typed(report.example_where)} as the model sees it (trained part in {marker}):")
        for line in format_runs(report.example, color).splitlines():
            write(f"    {line}")
    for warning in report.warnings:
        write(f"  warning: {warning}")
    for error in report.errors:
        write(f"  error: {error}")


def _as_typed(where: str) -> str:
    """A row's location relative to the working directory when it lies under it (as the user wrote the path)."""
    cwd = os.getcwd().rstrip("/") + "/"
    return where.removeprefix(cwd)


def run_check(config_path: str | Path, task: str | None = None, out: TextIO | None = None) -> int:
    """Check every task of a sweep config (or one); print the reports; the exit status (0 ok, 1 errors, 2 config)."""
    from transformers import AutoTokenizer

    from adapters.base_models import resolve_base
    from jobs.config import ConfigError, load_config

    out = out or sys.stdout
    path = Path(config_path)
    try:
        config = load_config(path).with_paths_from(Path.cwd())  # as the sweep does (the job's working dir)
    except ConfigError as err:
        print(f"error: {err}", file=out)
        return 2
    tasks = config.task_configs()
    if task is not None:
        if task not in tasks:
            print(f"error: --task {task}: not in {path} (tasks: {', '.join(tasks)})", file=out)
            return 2
        tasks = {task: tasks[task]}
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(config.base_model).path)
    reports = [check_task(name, t, tokenizer, config.training.max_seq_len) for name, t in tasks.items()]
    for report in reports:
        print_report(report, out)
        print(file=out)
    failed = [r.name for r in reports if not r.ok]
    print(
        f"{len(reports) - len(failed)} of {len(reports)} tasks ok"
        + (f"; errors in {', '.join(failed)}" if failed else ""),
        file=out,
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Check the data of a sweep config's tasks before training.")
    parser.add_argument("config", help="the sweep config (YAML)")
    parser.add_argument("--task", help="check only this task")
    args = parser.parse_args(argv)
    raise SystemExit(run_check(args.config, args.task))


if __name__ == "__main__":
    main()
