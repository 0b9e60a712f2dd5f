"""One training/eval example in the form every format is turned into, and what a task's data loads to.

An `Example` is either a chat conversation (`mode="chat"`: rendered with the base model's own chat template, loss on
assistant turns) or raw text (`mode="completion"`: prompt + completion, no template, loss on the completion).
`prompt_messages()` is what the model sees at evaluation and serving time for a chat example.

    from jobs.task_data.example import Example
    ex = Example(id="r1", where="train.jsonl:1", mode="chat",
                 messages=({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}),
                 completion="4", reference="4")
    ex.prompt_messages()   # [{"role": "user", "content": "2+2?"}]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["chat", "completion"]
LossTurns = Literal["assistant", "last"]


@dataclass(frozen=True)
class Example:
    """One row of a task, format-independent.

    chat: `messages` is the whole conversation (system/user/assistant), ending with an assistant turn; loss on every
    assistant turn (`loss_turns="assistant"`) or on the last one only (`"last"`: conversational prompt/completion,
    whose prompt may hold example answers). `completion` is the last assistant turn's text.
    completion: `prompt` + `completion` are raw text (the prompt already holds the task instruction, if any); the
    `text` format has prompt "" (loss on the whole text).
    `reference` is what the metric compares a prediction with ("" for `text`). `where` is "<file>:<row>" for
    messages; `id` the row's id column, else `where`."""

    id: str
    where: str
    mode: Mode
    messages: tuple[dict[str, str], ...] = ()
    prompt: str = ""
    completion: str = ""
    reference: str = ""
    loss_turns: LossTurns = field(default="assistant")

    def prompt_messages(self) -> list[dict[str, str]]:
        """chat: the messages before the last assistant turn (what the model answers at eval/serving time)."""
        if self.mode != "chat":
            raise ValueError(f"{self.where}: a completion-mode example has no messages; use .prompt")
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return [dict(m) for m in self.messages[:last]]

    def input_key(self) -> str:
        """The example's input as one string, for duplicate / train-eval overlap detection (exact match)."""
        if self.mode == "chat":
            return json.dumps(self.prompt_messages(), sort_keys=True, ensure_ascii=False)
        return self.prompt if self.prompt else self.completion


@dataclass(frozen=True)
class TaskData:
    """A task's loaded splits. `format` is the resolved format (never "auto"); `format_note` says how it was
    chosen; `fingerprint` (16 hex) changes whenever the rows would (files, dataset revision, config fields)."""

    train: list[Example]
    eval: list[Example]
    format: str
    format_note: str
    fingerprint: str
