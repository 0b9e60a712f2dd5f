"""One task made ready for a training loop: its rows loaded and encoded, its metric, the prompt format the adapter
will be stored with. Both loops (solo `jobs.train_loop`, co-training `jobs.cotrain_loop`) and preflight use it,
for bundled and user tasks alike.

    from jobs.task_runtime import prepare_task
    task = prepare_task(spec, tokenizer)      # spec: a jobs.config.TrialSpec
    task.train, task.eval, task.metric, task.prompt_format()
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from adapters.prompt_format import PromptFormat
from jobs.config import TrialSpec
from jobs.data import Encoded, encode_examples
from jobs.task_config import MetricConfig, TaskConfig
from jobs.task_data import Example, TaskData, load_task


def task_config_of(spec: TrialSpec) -> TaskConfig:
    """The spec's task config; a bundled task is resolved again here (its files are package data of this node)."""
    if spec.bundled:
        from jobs.tasks import bundled_task_config

        return bundled_task_config(spec.task)
    return spec.task_config


@dataclass
class PreparedTask:
    name: str
    config: TaskConfig
    data: TaskData
    train: list[Encoded]  # the training examples as token ids + labels
    eval: list[Example]  # the eval rows scored at the end (at most evaluation.max_examples)
    dropped: int  # training rows left out (overlength: drop)
    truncated: int  # training rows cut to max_seq_len (overlength: truncate)
    max_seq_len: int

    @property
    def metric(self) -> MetricConfig:
        return self.config.metric

    @property
    def metric_label(self) -> str:
        return self.config.metric.name

    def encode(self, tokenizer: Any, examples: list[Example]) -> list[Encoded]:
        """Examples (eval rows, for an eval loss) encoded the way training encodes them."""
        encoded, _ = encode_examples(tokenizer, examples, self.max_seq_len, "truncate")
        return encoded

    def prompt_format(self) -> PromptFormat:
        """What the adapter is trained with, stored next to its weights (adapters/prompt_format.py)."""
        first = self.data.train[0]
        if first.mode == "completion":
            prefix = f"{self.config.instruction}\n\n" if self.config.instruction else None
            return PromptFormat(mode="completion", prompt_prefix=prefix, format=self.data.format)
        return PromptFormat(mode="chat", system_prompt=self.config.instruction or common_system_prompt(self.data.train),
                            format=self.data.format)  # fmt: skip


def common_system_prompt(examples: list[Example]) -> str | None:
    """The system prompt every training conversation starts with, if they all share one (messages data that
    carries its own instruction): the adapter is served with it when a request has none."""
    firsts = Counter(
        ex.messages[0]["content"] if ex.messages and ex.messages[0].get("role") == "system" else None for ex in examples
    )
    if len(firsts) == 1:
        return next(iter(firsts))
    return None


def prepare_task(spec: TrialSpec, tokenizer: Any) -> PreparedTask:
    """Load and encode the spec's task. Raises jobs.task_data.DatasetError naming file, row and column."""
    config = task_config_of(spec)
    data = load_task(spec.task, config)
    t = spec.training
    encoded, stats = encode_examples(tokenizer, data.train, t.max_seq_len, config.overlength)
    return PreparedTask(spec.task, config, data, encoded, data.eval[: spec.evaluation.max_examples],
                        stats.dropped, stats.truncated, t.max_seq_len)  # fmt: skip
