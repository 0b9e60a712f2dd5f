"""Load a task's data: read its train/eval sources, resolve the format, turn rows into Examples, split, fingerprint.

Eval rows come from `eval` (another source), `eval_split` (a split of the train dataset) or `eval_fraction` (a seeded
shuffle of the train rows: the same rows for the same data and seed on every machine, disjoint from train).
`max_rows` then keeps the first N training rows. Every problem raises `DatasetError` naming the task, the file, the
row and the column. Rows are numbered from 1 per file (a JSONL row is its line when there are no blank lines; a CSV
header is not counted); a saved or hub dataset's rows are "<name>[<split>]:<n>".

    from jobs.task_data.load import load_task
    data = load_task("ticket_triage", task_config, base_dir=Path("."))
    print(data.format_note, len(data.train), len(data.eval), data.fingerprint)
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from pathlib import Path

from jobs.task_config import TaskConfig
from jobs.task_data.errors import DatasetError
from jobs.task_data.example import Example, TaskData
from jobs.task_data.formats import check_columns, detect_format, row_format, to_example
from jobs.task_data.sources import RawFile, RawSource, read_source


def _check_mixed(file: RawFile, task: TaskConfig) -> None:
    """`format: auto` and rows whose non-null columns fit different formats: name the first row of two of them."""
    first: dict[str, int] = {}
    for n, row in enumerate(file.rows, 1):
        fmt = row_format(row, task.columns)
        if fmt is not None and fmt not in first:
            first[fmt] = n
        if len(first) > 1:
            (a, row_a), (b, row_b) = list(first.items())[:2]
            raise DatasetError(f"{file.name}: mixed formats in one file: row {row_a} has the columns of {a}, row "
                               f"{row_b} those of {b}; use one format per file")  # fmt: skip


def _resolve_format(source: RawSource, task: TaskConfig) -> tuple[str, str]:
    """The format every file of `source` has, and the sentence that says how it was chosen."""
    chosen: tuple[str, str, str] | None = None  # (format, note, file)
    for file in source.files:
        if not file.rows:
            raise DatasetError(f"{file.name}: no rows (an empty split)")
        if task.format == "auto":
            _check_mixed(file, task)
            fmt, note = detect_format(file.columns, task.columns, where=file.name)
        else:
            check_columns(task.format, file.columns, task.columns, file.name)
            fmt, note = task.format, f"{task.format}, as set in the config"
        if chosen is None:
            chosen = (fmt, note, file.name)
        elif fmt != chosen[0]:
            raise DatasetError(f"{file.name} is {fmt} but {chosen[2]} is {chosen[0]}; use one format per task")
    assert chosen is not None  # read_source returns at least one file
    return chosen[0], chosen[1]


def _examples(source: RawSource, fmt: str, task: TaskConfig) -> list[Example]:
    return [
        to_example(row, fmt, task.columns, task.instruction, f"{file.name}:{n}")
        for file in source.files
        for n, row in enumerate(file.rows, 1)
    ]


def split_fraction(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): round(n * fraction) rows (at least 1) drawn by a seeded shuffle; both keep the file order."""
    n = len(examples)
    k = max(1, round(n * fraction))
    if n - k < 1:
        raise DatasetError(f"eval_fraction: {n} row(s) cannot be split into train and eval; add rows or give eval:")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def fingerprint(task: TaskConfig, fmt: str, train: RawSource, eval_source: RawSource | None) -> str:
    """16 hex: the sources' content and every config field that changes the rows."""
    payload = {
        "train": train.fingerprint,
        "eval": eval_source.fingerprint if eval_source else None,
        "format": fmt,
        "columns": dict(sorted(task.columns.items())),
        "instruction": task.instruction,
        "eval_fraction": task.eval_fraction,
        "split_seed": task.split_seed if task.eval_fraction is not None else None,
        "subset": task.subset,
        "train_split": task.train_split,
        "eval_split": task.eval_split,
        "max_rows": task.max_rows,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _load(task: TaskConfig, base_dir: Path, cache_dir: str) -> TaskData:
    common = {"base_dir": base_dir, "cache_dir": cache_dir, "subset": task.subset}
    train_source = read_source(task.train, key="train", split=task.train_split, **common)
    eval_source: RawSource | None = None
    if task.eval is not None:
        eval_source = read_source(task.eval, key="eval", split=None, **common)
    elif task.eval_split is not None:
        eval_source = read_source(task.train, key="eval_split", split=task.eval_split, split_required=True, **common)
    fmt, note = _resolve_format(train_source, task)
    train = _examples(train_source, fmt, task)
    if eval_source is not None:
        eval_fmt, _ = _resolve_format(eval_source, task)
        if eval_fmt != fmt:
            raise DatasetError(f"eval: {eval_source.files[0].name} is {eval_fmt} but train is {fmt}; use one format")
        evals = _examples(eval_source, fmt, task)
    else:
        if not train:
            raise DatasetError(f"train: {task.train} has no rows")
        train, evals = split_fraction(train, task.eval_fraction or 0.0, task.split_seed)
    if task.max_rows is not None:
        train = train[: task.max_rows]
    for key, rows in (("train", train), ("eval", evals)):
        if not rows:
            source = train_source if key == "train" else eval_source
            shown = ", ".join(f.name for f in source.files) if source else task.train
            raise DatasetError(f"{key}: {shown} has no rows")
    return TaskData(train, evals, fmt, note, fingerprint(task, fmt, train_source, eval_source))


def load_task(name: str, task: TaskConfig, base_dir: Path | None = None) -> TaskData:
    """Load task `name` (see the module docstring); relative paths resolve against `base_dir` (default: cwd)."""
    with tempfile.TemporaryDirectory(prefix="lorafleet-data-") as cache_dir:
        try:
            return _load(task, Path(base_dir) if base_dir is not None else Path.cwd(), cache_dir)
        except DatasetError as err:
            raise DatasetError(f"task {name}: {err}") from None
