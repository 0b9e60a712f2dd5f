"""Tests for the bundled task suite (jobs.tasks): registry, committed data, generators and split loading.

No model is loaded; the whole file runs in about a second.

    pytest tests/test_tasks.py -q
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import jobs.tasks as tasks_pkg
from jobs.tasks import (
    SPLIT_SIZES,
    TASKS,
    DatasetError,
    Task,
    UnknownTask,
    dataset_hash,
    get_task,
    load_split,
    split_path,
)
from jobs.tasks.generate import build_splits, render_jsonl

REPO = Path(__file__).resolve().parents[1]
NAMES = sorted(TASKS)


@pytest.fixture(scope="module")
def generated() -> dict[str, dict[str, list[dict]]]:
    return {name: build_splits(TASKS[name]) for name in NAMES}


def test_registry_covers_the_six_kinds() -> None:
    assert len(TASKS) >= 6
    kinds = {task.kind for task in TASKS.values()}
    assert {"classification", "extraction", "arithmetic", "text_to_sql", "mr_to_text", "normalisation"} <= kinds
    for name, task in TASKS.items():
        assert task.name == name
        assert task.metric in {"exact_match", "json_f1", "rouge_l"}
        assert task.instruction.strip()


def test_seeds_are_distinct_and_stable() -> None:
    # CRC32 of "sentiment" (zlib.crc32(b"sentiment")), checked against binascii which is a separate implementation
    import binascii

    for task in TASKS.values():
        assert task.seed == binascii.crc32(task.name.encode())
    assert len({task.seed for task in TASKS.values()}) == len(TASKS)


@pytest.mark.parametrize("name", NAMES)
def test_committed_files_match_regeneration(name: str, generated: dict) -> None:
    for split in ("train", "eval"):
        path = split_path(name, split)
        assert path.is_file(), f"{path} missing: run python -m jobs.tasks.generate"
        data = path.read_bytes()
        assert data == render_jsonl(generated[name][split]), f"{path} differs from a regeneration"
        assert len(data) < 1_000_000
        assert data.endswith(b"\n") and b"\n\n" not in data


def test_generation_is_repeatable_in_process() -> None:
    task = TASKS["sentiment"]
    assert build_splits(task) == build_splits(task)


def test_generate_check_under_another_hash_seed() -> None:
    """`--check` in a fresh interpreter with a different PYTHONHASHSEED: no dependence on hash() or set order."""
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.tasks.generate", "--check"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout


def test_generate_check_reports_stale_files(tmp_path: Path) -> None:
    from jobs.tasks.generate import main

    assert main(["--task", "word_math", "--out", str(tmp_path)]) == 0
    assert main(["--task", "word_math", "--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "word_math" / "eval.jsonl").write_text("{}\n")
    assert main(["--task", "word_math", "--out", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("name", NAMES)
def test_splits_sizes_ids_and_no_leakage(name: str) -> None:
    train, held_out = load_split(name, "train"), load_split(name, "eval")
    assert (len(train), len(held_out)) == (SPLIT_SIZES["train"], SPLIT_SIZES["eval"]) == (600, 100)
    train_inputs = [row["input"] for row in train]
    eval_inputs = [row["input"] for row in held_out]
    assert len(set(train_inputs)) == 600 and len(set(eval_inputs)) == 100
    assert not set(eval_inputs) & set(train_inputs)
    ids = [row["id"] for row in train + held_out]
    assert len(set(ids)) == 700
    assert train[0]["id"] == f"{name}-train-0000" and held_out[-1]["id"] == f"{name}-eval-0099"


@pytest.mark.parametrize("name", NAMES)
def test_every_output_scores_one_against_itself_and_rows_are_short(name: str) -> None:
    task = get_task(name)
    for row in load_split(name, "train") + load_split(name, "eval"):
        assert set(row) == {"id", "input", "output"}
        assert task.score(row["output"], row["output"]) == 1.0
        assert len(row["input"].split()) < 60
        assert "\n" not in row["output"] and len(row["output"].split()) <= 30


def test_messages_format() -> None:
    task = get_task("sentiment")
    row = {"id": "x", "input": "Great kettle.", "output": "positive"}
    assert task.messages(row) == [
        {"role": "system", "content": task.instruction},
        {"role": "user", "content": "Great kettle."},
    ]


# --- per-task checks of the outputs against an independent reading of the inputs ---


def test_sentiment_labels_balanced() -> None:
    labels = [row["output"] for row in load_split("sentiment", "train")]
    assert set(labels) == {"positive", "negative", "mixed"}
    assert min(labels.count(label) for label in set(labels)) > 150


def test_order_extraction_outputs() -> None:
    for row in load_split("order_extraction", "train"):
        obj = json.loads(row["output"])
        assert list(obj) == ["name", "item", "size", "quantity"]
        assert obj["size"] in {"small", "medium", "large"} and 1 <= obj["quantity"] <= 6
        assert obj["name"] in row["input"] and obj["item"] in row["input"].lower()


def _solve(problem: str) -> int:
    """An independent solver for the word_math templates, keyed on their verbs."""
    nums = [int(n) for n in re.findall(r"\d+", problem)]
    if "equally among" in problem:
        return nums[0] // nums[1]
    if "and then gives away" in problem:
        return nums[0] + nums[1] - nums[2]
    if re.search(r"gave|lost|takes out", problem):
        return nums[0] - nums[1]
    if re.search(r"in each bag|each box holds", problem):
        return nums[0] * nums[1]
    return nums[0] + nums[1]


def test_word_math_outputs_are_the_right_calculation() -> None:
    for row in load_split("word_math", "train") + load_split("word_math", "eval"):
        match = re.fullmatch(r"(\d+(?: [-+*/] \d+)+) = (\d+)", row["output"])
        assert match, row
        calculation, result = match.group(1), int(match.group(2))
        assert re.findall(r"\d+", calculation) == re.findall(r"\d+", row["input"]), (
            row
        )  # the problem's numbers, in order
        assert result == _solve(row["input"]), row
        tokens = calculation.split()  # left to right, which is also the right order for these one/two-step forms
        value = int(tokens[0])
        for op, num in zip(tokens[1::2], map(int, tokens[2::2]), strict=True):
            value = {"+": value + num, "-": value - num, "*": value * num, "/": value // num}[op]
        assert value == result, row


def test_text_to_sql_queries_run_on_the_schema() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE employees (name TEXT, department TEXT, city TEXT, salary INTEGER, hire_year INTEGER)")
    db.execute("INSERT INTO employees VALUES ('Ada', 'Engineering', 'Boston', 120000, 2015)")
    for row in load_split("text_to_sql", "train") + load_split("text_to_sql", "eval"):
        assert row["output"].startswith("SELECT ") and not row["output"].endswith(";")
        db.execute(row["output"]).fetchall()  # raises on invalid SQL
    assert db.execute("SELECT name FROM employees WHERE department = 'Engineering' AND hire_year > 2010").fetchall()


_DATE_FORMATS = ("%B %d, %Y", "%d %B %Y", "%b %d, %Y", "%A, %B %d, %Y", "%m/%d/%Y", "%d-%b-%Y", "%Y/%m/%d")


def _read_date(text: str) -> dt.date:
    """Parse the date out of a date_normalisation input with strptime (C locale month/day names)."""
    text = re.sub(r"(\d+)(st|nd|rd|th) of (\w+)", r"\1 \3", text)  # "the 5th of March 2021" -> "5 March 2021"
    candidates = re.findall(r"[A-Z]?[\w/,\- ]+\d{4}(?:/\d\d/\d\d)?", text)
    for candidate in candidates:
        words = candidate.split()
        for start in range(len(words)):
            chunk = " ".join(words[start:])
            for fmt in _DATE_FORMATS:
                try:
                    return dt.datetime.strptime(chunk, fmt).date()
                except ValueError:
                    continue
    raise AssertionError(f"no date found in {text!r}")


def test_date_normalisation_outputs_match_the_written_date() -> None:
    for row in load_split("date_normalisation", "train") + load_split("date_normalisation", "eval"):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["output"])
        assert _read_date(row["input"]).isoformat() == row["output"], row


def test_viggo_outputs_mention_every_slot_value() -> None:
    for row in load_split("viggo", "train"):
        match = re.fullmatch(r"(\w+)\((.*)\)", row["input"])
        assert match and match.group(1) in {"inform", "recommend", "give_opinion", "confirm"}
        for value in re.findall(r"\[([^\]]*)\]", match.group(2)):
            for part in value.split(", "):
                assert part in row["output"], (part, row)


# --- loading and errors ---


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"id": "a", "input": "x", "output": "y"})


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        (json.dumps({"id": "b", "input": "x"}), "missing field 'output'"),
        (json.dumps({"output": "y"}), "missing field 'input'"),
        (json.dumps({"input": "x", "output": "  "}), "field 'output' is empty"),
        (json.dumps({"input": 3, "output": "y"}), "field 'input' must be a string"),
        ('["x", "y"]', "expected a JSON object, got list"),
        ('{"input": "x", ', "invalid JSON"),
    ],
)
def test_load_split_names_file_line_and_problem(tmp_path: Path, bad_line: str, problem: str) -> None:
    path = _write(tmp_path, [GOOD, "", bad_line])  # blank line 2 is skipped; the bad row is line 3
    with pytest.raises(DatasetError) as err:
        load_split("sentiment", "train", path=path)
    message = str(err.value)
    assert f"{path}:3:" in message and problem in message and "\n" not in message


def test_load_split_custom_path_fills_missing_ids(tmp_path: Path) -> None:
    path = _write(tmp_path, [GOOD, json.dumps({"input": "p", "output": "q"})])
    rows = load_split("sentiment", "eval", path=path)
    assert rows == [{"id": "a", "input": "x", "output": "y"}, {"id": "sentiment-eval-2", "input": "p", "output": "q"}]


def test_load_split_missing_and_empty_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_split("viggo", "eval", path=missing)
    with pytest.raises(DatasetError, match="no rows"):
        load_split("viggo", "eval", path=_write(tmp_path, ["", "  "]))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_split("viggo", "test")


def test_unknown_task_lists_known_names() -> None:
    with pytest.raises(UnknownTask) as err:
        get_task("sentimant")
    assert isinstance(err.value, KeyError)
    message = str(err.value)
    assert message.startswith("unknown task 'sentimant'")
    assert all(name in message for name in TASKS)
    with pytest.raises(UnknownTask):
        load_split("sentimant", "train")


def test_dataset_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "word_math"
    expected = hashlib.sha256(split_path(name, "train").read_bytes() + split_path(name, "eval").read_bytes())
    assert dataset_hash(name) == expected.hexdigest()[:16]
    for split in ("train", "eval"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{split}.jsonl").write_bytes(split_path(name, split).read_bytes())
    monkeypatch.setattr(tasks_pkg, "data_dir", lambda: tmp_path)
    assert dataset_hash(name) == expected.hexdigest()[:16]
    (tmp_path / name / "eval.jsonl").write_bytes(b'{"input": "x", "output": "y"}\n')
    assert dataset_hash(name) != expected.hexdigest()[:16]


def test_task_is_frozen() -> None:
    task: Task = get_task("viggo")
    with pytest.raises(AttributeError):
        task.metric = "exact_match"  # type: ignore[misc]
