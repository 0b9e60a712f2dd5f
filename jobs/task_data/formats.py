"""Row formats: detect a file's format from its columns (`format: auto`) and turn one raw row into an `Example`.

| format            | columns (canonical; `columns:` maps them) | becomes                                          |
|-------------------|-------------------------------------------|--------------------------------------------------|
| input_output      | input, output                             | chat: [system(instruction)], user, assistant      |
| alpaca            | instruction, output, [input]              | chat: user = instruction (+ "\\n\\n" + input)     |
| messages          | messages (list of {role, content})        | chat, multi-turn as given; loss on every answer   |
| prompt_completion | prompt, completion (text)                 | completion: raw text, loss on the completion      |
| prompt_completion | prompt (messages), completion (messages)  | chat: loss on the completion turn only            |
| text              | text                                      | completion: prompt "", loss on all of the text    |

A task's `instruction` is the system turn of chat examples (unless a conversation has its own) and is put before
the prompt (+ "\\n\\n") of raw prompt/completion examples.

    from jobs.task_data.formats import detect_format, to_example
    detect_format(["question", "answer"], {"input": "question", "output": "answer"})
    # ("input_output", "detected input_output from columns question (input), answer (output)")
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jobs.task_data.errors import DatasetError
from jobs.task_data.example import Example

# Columns a row must have (non-null) to be of a format, in detection order (alpaca before input_output: it has both).
REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "input_output": ("input", "output"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")


def column(field: str, columns_map: Mapping[str, str]) -> str:
    """The column holding canonical `field` (mapped by `columns:`, else the field's own name)."""
    return columns_map.get(field, field)


def _shown(field: str, columns_map: Mapping[str, str]) -> str:
    col = column(field, columns_map)
    return f"'{col}'" if col == field else f"'{col}' ({field})"


def _candidates(present: set[str], columns_map: Mapping[str, str]) -> list[str]:
    found = [f for f, need in REQUIRED.items() if all(column(c, columns_map) in present for c in need)]
    if "alpaca" in found and "input_output" in found:
        found.remove("input_output")  # alpaca rows also have input + output
    return found


def _suggest(fmt: str, columns: list[str], columns_map: Mapping[str, str]) -> str:
    """A `columns:` mapping from the format's missing fields to found columns nobody uses yet (a hint)."""
    used = {column(f, columns_map) for f in REQUIRED[fmt]} | {"id"}
    spare = [c for c in columns if c not in used]
    missing = [f for f in REQUIRED[fmt] if column(f, columns_map) not in columns]
    pairs = [f"{f}: {c}" for f, c in zip(missing, spare, strict=False)]
    return "{" + ", ".join(pairs or [f"{f}: <column>" for f in missing]) + "}"


def detect_format(columns: list[str], columns_map: Mapping[str, str], where: str = "") -> tuple[str, str]:
    """The format whose required columns are all present, and the sentence saying so. Raises DatasetError when no
    format or several fit (then `format:` must be set)."""
    prefix = f"{where}: " if where else ""
    found = _candidates(set(columns), columns_map)
    if len(found) == 1:
        fmt = found[0]
        used = [c for c in REQUIRED[fmt] + (("input",) if fmt == "alpaca" else ()) if column(c, columns_map) in columns]
        named = [column(c, columns_map) + ("" if column(c, columns_map) == c else f" ({c})") for c in used]
        return fmt, f"detected {fmt} from columns {', '.join(named)}"
    listed = ", ".join(columns) or "(none)"
    if found:
        raise DatasetError(f"{prefix}columns {listed} fit several formats ({', '.join(found)}); set format: to one")
    expected = "; ".join(f"{fmt}: {', '.join(need)}" for fmt, need in REQUIRED.items())
    raise DatasetError(
        f"{prefix}cannot detect the format from columns {listed}; expected the columns of one format ({expected}). "
        f"Map yours with columns:, e.g. format: input_output and columns: {_suggest('input_output', columns, columns_map)}"
    )


def check_columns(fmt: str, columns: list[str], columns_map: Mapping[str, str], where: str) -> None:
    """Raise DatasetError naming the missing columns of an explicit `fmt`, the columns found and a `columns:` hint."""
    missing = [f for f in REQUIRED[fmt] if column(f, columns_map) not in columns]
    if missing:
        need = ", ".join(_shown(f, columns_map) for f in missing)
        raise DatasetError(
            f"{where}: format {fmt} needs column{'s' if len(missing) > 1 else ''} {need}; found columns: {', '.join(columns) or '(none)'}. "
            f"Map yours with columns: {_suggest(fmt, columns, columns_map)}"
        )


def row_format(row: Mapping[str, Any], columns_map: Mapping[str, str]) -> str | None:
    """The format a single row fits by its non-null values (None: none); used to find files that mix formats."""
    found = _candidates({k for k, v in row.items() if v is not None}, columns_map)
    return found[0] if found else None


def _text(row: Mapping[str, Any], field: str, columns_map: Mapping[str, str], where: str, *,
          empty_ok: bool = False, optional: bool = False) -> str:  # fmt: skip
    col = column(field, columns_map)
    value = row.get(col)
    if value is None:
        if optional:
            return ""
        raise DatasetError(f"{where}: column {_shown(field, columns_map)} is missing or null")
    if not isinstance(value, str):
        raise DatasetError(
            f"{where}: column {_shown(field, columns_map)} must be text, got {type(value).__name__} "
            f"{json.dumps(value, default=str)[:60]} (quote it in the file)"
        )
    if not empty_ok and not value.strip():
        raise DatasetError(f"{where}: column {_shown(field, columns_map)} is empty")
    return value


def _messages(value: Any, where: str, shown: str) -> list[dict[str, str]]:
    """Validate a list of {role, content} messages (a JSON string of one is accepted, as CSV cells hold)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DatasetError(
                f"{where}: column {shown} must be a list of {{role, content}} messages, got text"
            ) from None
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: column {shown} must be a non-empty list of {{role, content}} messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: column {shown}, message {i}: expected an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DatasetError(f"{where}: column {shown}, message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            got = "nothing" if content is None else type(content).__name__
            raise DatasetError(f"{where}: column {shown}, message {i} ({role}): content must be text, got {got}")
        if role == "system" and i > 1:
            raise DatasetError(f"{where}: column {shown}, message {i}: a system message may only come first")
        if role == "assistant" and not content.strip():
            raise DatasetError(f"{where}: column {shown}, message {i}: the assistant's content is empty")
        out.append({"role": role, "content": content})
    return out


def _with_system(messages: list[dict[str, str]], instruction: str | None) -> list[dict[str, str]]:
    if instruction and messages[0]["role"] != "system":
        return [{"role": "system", "content": instruction}, *messages]
    return messages


def _conversation(messages: list[dict[str, str]], where: str, shown: str) -> None:
    """A trainable conversation: user speaks first (after an optional system turn) and the assistant last."""
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in turns:
        raise DatasetError(f"{where}: column {shown} has no assistant turn (nothing to learn from)")
    if turns[0] != "user":
        raise DatasetError(f"{where}: column {shown}: the first turn after the system message must be the user's")
    if turns[-1] != "assistant":
        raise DatasetError(f"{where}: column {shown} ends with a {turns[-1]} turn; end it with the assistant's answer")


def _chat(row_id: str, where: str, messages: list[dict[str, str]], loss_turns: str = "assistant") -> Example:
    answer = messages[-1]["content"]
    return Example(id=row_id, where=where, mode="chat", messages=tuple(messages), completion=answer,
                   reference=answer, loss_turns=loss_turns)  # type: ignore[arg-type]  # fmt: skip


def _prompt_completion(row: Mapping[str, Any], columns_map: Mapping[str, str], instruction: str | None,
                       row_id: str, where: str) -> Example:  # fmt: skip
    prompt, completion = row.get(column("prompt", columns_map)), row.get(column("completion", columns_map))
    shown_p, shown_c = _shown("prompt", columns_map), _shown("completion", columns_map)
    if isinstance(prompt, list):  # conversational: the prompt is messages, the completion one assistant turn
        messages = _messages(prompt, where, shown_p)
        if messages[-1]["role"] != "user":
            raise DatasetError(f"{where}: column {shown_p}: a conversational prompt must end with a user turn")
        if isinstance(completion, str):
            answer = [{"role": "assistant", "content": completion}]
        elif isinstance(completion, dict | list):
            answer = _messages(completion if isinstance(completion, list) else [completion], where, shown_c)
        else:
            raise DatasetError(f"{where}: column {shown_c} must be text or one assistant message")
        if len(answer) != 1 or answer[0]["role"] != "assistant" or not answer[0]["content"].strip():
            raise DatasetError(f"{where}: column {shown_c} must hold exactly one non-empty assistant message")
        full = _with_system(messages + answer, instruction)
        _conversation(full, where, shown_p)
        return _chat(row_id, where, full, loss_turns="last")
    if isinstance(completion, list | dict):
        raise DatasetError(f"{where}: column {shown_p} is text but {shown_c} is messages; use text for both or "
                           "messages for both")  # fmt: skip
    prompt_text = _text(row, "prompt", columns_map, where, empty_ok=True)
    answer_text = _text(row, "completion", columns_map, where)
    if instruction:
        prompt_text = f"{instruction}\n\n{prompt_text}"
    return Example(id=row_id, where=where, mode="completion", prompt=prompt_text, completion=answer_text,
                   reference=answer_text)  # fmt: skip


def to_example(row: Mapping[str, Any], fmt: str, columns_map: Mapping[str, str], instruction: str | None,
               where: str) -> Example:  # fmt: skip
    """One raw row (column -> value) of format `fmt` as an Example; DatasetError names `where` and the column."""
    raw_id = row.get(column("id", columns_map))
    row_id = str(raw_id) if raw_id is not None else where
    if fmt == "input_output":
        user = _text(row, "input", columns_map, where)
        answer = _text(row, "output", columns_map, where)
        messages = _with_system([{"role": "user", "content": user}], instruction)
        return _chat(row_id, where, [*messages, {"role": "assistant", "content": answer}])
    if fmt == "alpaca":
        task = _text(row, "instruction", columns_map, where)
        extra = _text(row, "input", columns_map, where, empty_ok=True, optional=True)
        answer = _text(row, "output", columns_map, where)
        user = f"{task}\n\n{extra}" if extra.strip() else task
        messages = _with_system([{"role": "user", "content": user}], instruction)
        return _chat(row_id, where, [*messages, {"role": "assistant", "content": answer}])
    if fmt == "messages":
        shown = _shown("messages", columns_map)
        messages = _with_system(_messages(row.get(column("messages", columns_map)), where, shown), instruction)
        _conversation(messages, where, shown)
        return _chat(row_id, where, messages)
    if fmt == "prompt_completion":
        return _prompt_completion(row, columns_map, instruction, row_id, where)
    if fmt == "text":
        text = _text(row, "text", columns_map, where)
        return Example(id=row_id, where=where, mode="completion", prompt="", completion=text, reference="")
    raise ValueError(f"unknown format {fmt!r}")
