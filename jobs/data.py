"""Training data: task rows -> token ids with the base model's chat template, loss only on the completion.

`encode_row` splits the templated conversation into the prompt (system + user + the assistant header: label
-100) and the completion (the answer and the template's end-of-turn: trained). `Batches` yields micro-batches in
a seeded order that is a pure function of (seed, epoch, position), so a resumed run continues exactly where the
checkpoint left off. With `packing`, several examples share one row: positions restart per example and a
block-diagonal attention mask keeps them from seeing each other, so packed loss equals unpacked loss.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def prompt_text(tokenizer: Any, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_row(tokenizer: Any, messages: list[dict], completion: str, max_len: int) -> Encoded | None:
    """Token ids and labels for one example; None if the prompt alone does not fit `max_len`."""
    prompt = prompt_text(tokenizer, messages)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(prompt):  # a template that rewrites earlier turns: fall back to answer + eos
        tail = completion + (tokenizer.eos_token or "")
    else:
        tail = full[len(prompt) :]
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids
    if len(prompt_ids) >= max_len:
        return None
    tail_ids = tail_ids[: max_len - len(prompt_ids)]
    return Encoded(prompt_ids + tail_ids, [IGNORE] * len(prompt_ids) + tail_ids)


def encode_rows(tokenizer: Any, task: Any, rows: list[dict], max_len: int) -> list[Encoded]:
    encoded = [encode_row(tokenizer, task.messages(row), row["output"], max_len) for row in rows]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise ValueError(f"no example of task {task.name} fits max_seq_len={max_len}")
    return kept


def pack(examples: list[Encoded], max_len: int) -> list[list[Encoded]]:
    """Greedy first-fit (in order) of examples into rows of at most `max_len` tokens."""
    rows: list[list[Encoded]] = []
    current: list[Encoded] = []
    used = 0
    for ex in examples:
        if current and used + len(ex.input_ids) > max_len:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex.input_ids)
    if current:
        rows.append(current)
    return rows


def collate(rows: list[list[Encoded]], pad_id: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Left-padded batch with explicit position ids (each example counts from 0), so every row's completion ends
    at the right edge and the loss needs logits for only the last few positions (see `train_loop.loss_sum`).
    Each row holds one or more examples; with more than one (packing) the batch carries a 4D additive attention
    mask (block-diagonal and causal); otherwise a 2D padding mask."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        col = width - sum(len(e.input_ids) for e in row)
        for s, ex in enumerate(row):
            n = len(ex.input_ids)
            ids[r, col : col + n] = torch.tensor(ex.input_ids)
            labels[r, col : col + n] = torch.tensor(ex.labels)
            positions[r, col : col + n] = torch.arange(n)
            segment[r, col : col + n] = s
            col += n
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if any(len(row) > 1 for row in rows):
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
        allowed = (same & causal) | torch.eye(width, dtype=torch.bool)  # padding attends to itself only
        mask = torch.zeros(len(rows), 1, width, width, dtype=dtype)
        batch["attention_mask"] = mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    else:
        batch["attention_mask"] = (segment >= 0).long()
    return batch


class Batches:
    """Micro-batches of one worker's shard, in a seeded order; `at(step_index)` is deterministic."""

    def __init__(self, examples: list[Encoded], micro_batch: int, max_len: int, packing: bool, seed: int,
                 rank: int = 0, world: int = 1) -> None:  # fmt: skip
        units = pack(examples, max_len) if packing else [[e] for e in examples]
        self.units = units[rank::world]
        if len(self.units) < micro_batch:
            raise ValueError(f"only {len(self.units)} training rows for this worker; micro_batch_size is {micro_batch}")
        self.micro_batch = micro_batch
        self.seed = seed
        self.per_epoch = len(self.units) // micro_batch
        self._order_cache: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = list(range(len(self.units)))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def at(self, index: int) -> list[list[Encoded]]:
        """The `index`-th micro-batch of the whole run (epochs follow each other)."""
        epoch, offset = divmod(index, self.per_epoch)
        order = self._order(epoch)
        return [self.units[i] for i in order[offset * self.micro_batch : (offset + 1) * self.micro_batch]]

    def iterate(self, start: int) -> Iterator[tuple[int, list[list[Encoded]]]]:
        index = start
        while True:
            yield index, self.at(index)
            index += 1
