"""Row formats of task data (jobs/task_data/formats.py via load_task): every format becomes the right Example,
`format: auto` detects and says what it detected, and bad rows are refused naming file, row and column.

    .venv/bin/python -m pytest -q tests/test_task_data_formats.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_messages import assistant, system, user

from jobs.task_config import TaskConfig
from jobs.task_data import DatasetError, Example, detect_format, load_task


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def load(tmp_path: Path, rows: list[dict], **config) -> tuple[list[Example], str, str]:
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", rows[:1])
    data = load_task("t", TaskConfig(train="train.jsonl", eval="eval.jsonl", **config), base_dir=tmp_path)
    return data.train, data.format, data.format_note


def test_input_output_is_chat_with_the_instruction_as_system_turn(tmp_path: Path) -> None:
    train, fmt, note = load(tmp_path, [{"id": "r1", "input": "2+2", "output": "4"}], instruction="Add.")
    (ex,) = train
    assert fmt == "input_output" and note == "detected input_output from columns input, output"
    assert ex.mode == "chat" and ex.id == "r1" and ex.where == "train.jsonl:1"
    assert ex.messages == (system("Add."), user("2+2"), assistant("4"))
    assert ex.prompt_messages() == [system("Add."), user("2+2")]
    assert ex.reference == ex.completion == "4"


def test_alpaca_joins_instruction_and_input(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    train, fmt, note = load(tmp_path, rows)
    assert fmt == "alpaca" and note == "detected alpaca from columns instruction, output, input"
    assert train[0].messages == (user("Translate.\n\nchat"), assistant("cat"))
    assert train[1].messages == (user("Say hi."), assistant("hi"))
    assert train[1].id == "train.jsonl:2"  # no id column: the row's place


def test_messages_multi_turn_keeps_turns_and_prepends_the_instruction(tmp_path: Path) -> None:
    conversation = [user("Hi"), assistant("Hello!"), user("2+2?"), assistant("4")]
    rows = [{"messages": conversation}, {"messages": [system("Own."), user("a"), assistant("b")]}]
    train, fmt, _ = load(tmp_path, rows, instruction="Be brief.")
    assert fmt == "messages"
    assert train[0].messages == (system("Be brief."), *conversation)
    assert train[0].reference == "4" and train[0].loss_turns == "assistant"
    assert train[0].prompt_messages() == [system("Be brief."), user("Hi"), assistant("Hello!"), user("2+2?")]
    assert train[1].messages[0] == system("Own.")  # a conversation's own system turn is kept, not doubled


def test_prompt_completion_is_raw_text_with_the_instruction_before_the_prompt(tmp_path: Path) -> None:
    train, fmt, _ = load(tmp_path, [{"prompt": "Q: 2+2\nA:", "completion": " 4"}], instruction="Answer.")
    (ex,) = train
    assert fmt == "prompt_completion" and ex.mode == "completion" and ex.messages == ()
    assert (ex.prompt, ex.completion, ex.reference) == ("Answer.\n\nQ: 2+2\nA:", " 4", " 4")


def test_conversational_prompt_completion_trains_the_completion_turn_only(tmp_path: Path) -> None:
    rows = [
        {"prompt": [user("1+1"), assistant("2"), user("2+2")], "completion": [assistant("4")]},
        {"prompt": [user("3+3")], "completion": [assistant("6")]},
    ]
    train, fmt, _ = load(tmp_path, rows)
    assert fmt == "prompt_completion"
    assert train[0].mode == "chat" and train[0].loss_turns == "last"
    assert train[0].messages == (user("1+1"), assistant("2"), user("2+2"), assistant("4"))
    assert train[0].prompt_messages() == [user("1+1"), assistant("2"), user("2+2")]
    assert train[1].reference == "6"


def test_text_trains_on_everything(tmp_path: Path) -> None:
    train, fmt, _ = load(tmp_path, [{"text": "once upon a time"}], metric="eval_loss")
    (ex,) = train
    assert fmt == "text" and ex.mode == "completion"
    assert (ex.prompt, ex.completion, ex.reference) == ("", "once upon a time", "")


def test_columns_map_other_names(tmp_path: Path) -> None:
    rows = [{"question": "2+2", "answer": "4", "key": 17}]
    train, fmt, note = load(tmp_path, rows, columns={"input": "question", "output": "answer", "id": "key"})
    assert fmt == "input_output" and note == "detected input_output from columns question (input), answer (output)"
    assert train[0].messages == (user("2+2"), assistant("4")) and train[0].id == "17"


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["input", "output", "id"], "input_output"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["prompt", "completion"], "prompt_completion"),
        (["messages", "source"], "messages"),
        (["text"], "text"),
    ],
)
def test_detect_format(columns: list[str], expected: str) -> None:
    fmt, note = detect_format(columns, {})
    assert fmt == expected and note.startswith(f"detected {expected} from columns ")


def test_detect_format_refuses_unknown_and_ambiguous_columns() -> None:
    with pytest.raises(
        DatasetError,
        match=r"cannot detect the format from columns question, answer.*columns: \{input: question, output: answer\}",
    ):
        detect_format(["question", "answer"], {})
    with pytest.raises(DatasetError, match="fit several formats .*prompt_completion, input_output.*set format"):
        detect_format(["prompt", "completion", "input", "output"], {})


def test_missing_column_lists_found_columns_and_suggests_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load(tmp_path, [{"question": "a", "output": "b"}], format="input_output")
    assert str(err.value) == (
        "task t: train.jsonl: format input_output needs column 'input'; found columns: question, output. "
        "Map yours with columns: {input: question}"
    )


def test_mixed_formats_in_one_file_name_the_rows(tmp_path: Path) -> None:
    rows = [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}, {"prompt": "e", "completion": "f"}]
    with pytest.raises(
        DatasetError,
        match=r"train.jsonl: mixed formats in one file: row 1 has the columns of input_output, row 3 those of prompt_completion",
    ):
        load(tmp_path, rows)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([user("hi")], "has no assistant turn"),
        ([user("hi"), {"role": "bot", "content": "x"}], "message 2: role 'bot' is not one of system, user, assistant"),
        (
            [user("hi"), {"role": "assistant", "content": None}],
            r"message 2 \(assistant\): content must be text, got nothing",
        ),
        ([user("hi"), {"role": "assistant", "content": 5}], r"message 2 \(assistant\): content must be text, got int"),
        ([assistant("x")], "the first turn after the system message must be the user's"),
        ([user("a"), assistant("b"), user("c")], "ends with a user turn"),
        ([user("a"), system("s"), assistant("b")], "message 2: a system message may only come first"),
    ],
)
def test_bad_messages_rows_are_refused(tmp_path: Path, messages: list, problem: str) -> None:
    rows = [{"messages": [user("ok"), assistant("fine")]}, {"messages": messages}]
    with pytest.raises(DatasetError, match=rf"task t: train.jsonl:2: column 'messages'.*{problem}"):
        load(tmp_path, [rows[0], rows[1]], format="messages")


def test_non_text_and_empty_values_name_row_and_column(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"train.jsonl:2: column 'output' must be text, got int 5"):
        load(tmp_path, [{"input": "a", "output": "b"}, {"input": "c", "output": 5}])
    with pytest.raises(DatasetError, match=r"train.jsonl:1: column 'answer' \(output\) is empty"):
        load(tmp_path, [{"question": "a", "answer": " "}], columns={"input": "question", "output": "answer"})
    with pytest.raises(DatasetError, match=r"train.jsonl:1: column 'prompt' is text but 'completion' is messages"):
        load(tmp_path, [{"prompt": "a", "completion": [assistant("b")]}])


def test_train_and_eval_must_share_a_format(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"input": "a", "output": "b"}])
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DatasetError, match="eval: eval.jsonl is prompt_completion but train is input_output"):
        load_task("t", TaskConfig(train="train.jsonl", eval="eval.jsonl"), base_dir=tmp_path)
