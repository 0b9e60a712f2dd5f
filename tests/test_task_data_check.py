"""`lorafleet data check` (jobs/task_data/check.py): the per-task report (rows, format, token lengths, label balance,
duplicates, train/eval overlap, the rendered example with its trained part marked), its errors, and the exit status.

    .venv/bin/python -m pytest -q tests/test_task_data_check.py
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from adapters.tiny_llama import build_byte_tokenizer
from cluster.cli import app
from jobs.task_config import TaskConfig
from jobs.task_data.check import check_task, percentile, print_report, run_check


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_byte_tokenizer()


def triage_files(folder: Path) -> None:
    train = [{"prompt": f"ticket {i}: my card was charged twice", "completion": " billing"} for i in range(6)]
    train += [{"prompt": f"ticket {i}: the app crashes", "completion": " bug"} for i in range(6, 9)]
    train.append(train[0])  # one duplicate input
    evals = [train[1], {"prompt": "ticket 99: cannot log in", "completion": " bug"}]  # one row also in train
    (folder / "train.jsonl").write_text(jsonl(train))
    (folder / "eval.jsonl").write_text(jsonl(evals))


def test_report_counts_lengths_labels_duplicates_and_marks_the_trained_part(tmp_path: Path, tok: Any) -> None:
    triage_files(tmp_path)
    task = TaskConfig(train="train.jsonl", eval="eval.jsonl", instruction="Route the ticket.",
                      metric={"name": "choice", "labels": ["billing", "bug"]})  # fmt: skip
    report = check_task("triage", task, tok, max_seq_len=70, base_dir=tmp_path)
    assert report.ok, report.errors
    assert report.rows == {"train": 10, "eval": 2} and report.format == "prompt_completion"
    assert report.format_note == "detected prompt_completion from columns prompt, completion"
    # byte tokenizer: "Route the ticket.\n\n" (19) + prompt + completion + eos
    lengths = [19 + len(f"ticket {i}: my card was charged twice") + len(" billing") + 1 for i in range(6)]
    lengths += [19 + len(f"ticket {i}: the app crashes") + len(" bug") + 1 for i in range(6, 9)] + [lengths[0]]
    assert report.tokens == {"p50": percentile(lengths, 0.5), "p95": percentile(lengths, 0.95), "max": max(lengths)}
    assert report.over_max == 0
    assert report.label_balance == {"train": {"billing": 7, "bug": 3}, "eval": {"billing": 1, "bug": 1}}
    assert report.duplicates == 1 and report.overlap == 1
    assert any(
        "1 train rows repeat an earlier row's input (train.jsonl:10 = train.jsonl:1)" in w for w in report.warnings
    )
    assert any("1 eval rows also appear in train" in w and "eval.jsonl:1 = train.jsonl:2" in w for w in report.warnings)
    out = io.StringIO()
    print_report(report, out, color=False)
    text = out.getvalue()
    assert "  rows: train 10, eval 2\n" in text
    assert "  labels (train): billing 7, bug 3\n" in text
    assert "example train.jsonl:1 as the model sees it (trained part in ⟦ ⟧):\n    Route the ticket.\n" in text
    assert "    ticket 0: my card was charged twice⟦ billing<|im_end|>⟧\n" in text
    coloured = io.StringIO()
    print_report(report, coloured, color=True)
    assert "\x1b[32m billing<|im_end|>\x1b[0m" in coloured.getvalue()


def test_overlength_and_one_class_labels(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "t.jsonl").write_text(jsonl([{"input": "x" * n, "output": "yes"} for n in (5, 50, 60)]))
    task = TaskConfig(train="t.jsonl", eval="t.jsonl", metric="choice")
    report = check_task("t", task, tok, max_seq_len=64, base_dir=tmp_path)
    # byte tokenizer, ChatML: "<|im_start|>user\n" 6 + input + "<|im_end|>\n" 2 + "<|im_start|>assistant\n" 11
    # + "yes<|im_end|>\n" 5 = 24 + len(input): 29, 74, 84 tokens
    assert report.tokens == {"p50": 74, "p95": 84, "max": 84} and report.over_max == 2
    assert any(w.startswith("2 of 3 train rows are longer than max_seq_len=64 (t.jsonl:2, t.jsonl:3): they are cut")
               for w in report.warnings)  # fmt: skip
    assert any(e.startswith("eval references: choice: the references hold one class ('yes'") for e in report.errors)
    strict = check_task("t", task.model_copy(update={"overlength": "error"}), tok, max_seq_len=64, base_dir=tmp_path)
    assert any("overlength: error stops the run" in e for e in strict.errors)


def test_load_errors_become_report_errors(tmp_path: Path, tok: Any) -> None:
    report = check_task("t", TaskConfig(train="missing.jsonl", eval_fraction=0.1), tok, 64, base_dir=tmp_path)
    assert not report.ok and report.errors[0].startswith("task t: train: missing.jsonl: file not found")
    out = io.StringIO()
    print_report(report, out)
    assert out.getvalue().startswith("task t: FAILED\n  error: task t: train: missing.jsonl: file not found")


def test_cli_checks_every_task_of_a_config_and_exits_non_zero_on_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative data paths are relative to where the command runs (as for the sweep)
    triage_files(tmp_path)
    (tmp_path / "bad.jsonl").write_text(jsonl([{"question": "a", "answer": "b"}] * 3))
    config = {
        "name": "check-test",
        "base_model": "tiny-llama",
        "training": {"max_seq_len": 128, "max_steps": 5},
        "tasks": {
            "triage": {"train": "train.jsonl", "eval": "eval.jsonl", "metric": "choice"},
            "broken": {"train": "bad.jsonl", "eval_fraction": 0.3},
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    out = io.StringIO()
    assert run_check(path, "triage", out) == 0
    assert out.getvalue().startswith("task triage: ok\n") and out.getvalue().endswith("1 of 1 tasks ok\n")
    result = CliRunner().invoke(app, ["data", "check", str(path)])
    assert result.exit_code == 1, result.output
    assert (
        "task broken: FAILED" in result.output
        and "cannot detect the format from columns question, answer" in result.output
    )
    assert result.output.rstrip().endswith("1 of 2 tasks ok; errors in broken")
    missing = io.StringIO()
    assert run_check(path, "nope", missing) == 2 and "--task nope: not in" in missing.getvalue()
