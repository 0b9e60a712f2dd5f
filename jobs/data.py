"""Training data: Examples -> token ids and labels (loss only on what the model should learn), and micro-batches.

`encode_example` renders a chat example with the base model's own chat template and trains on every assistant turn
(each ending with the template's end-of-turn token); a completion example is `tokenizer(prompt)` (with special
tokens, as /v1/completions does) + `tokenizer(completion)` + eos, trained on completion + eos. Rows longer than
`max_len` are cut from the end, dropped or refused (`overlength`). `eval_prompt_ids` is exactly what the server
feeds the model for the same example (serve_app/model_service.py `ModelService.encode`).
`Batches` yields micro-batches in a seeded order that is a pure function of (seed, epoch, position), so a resumed run
continues exactly where the checkpoint left off. With `packing`, several examples share one row: positions restart
per example and a block-diagonal attention mask keeps them from seeing each other, so packed loss equals unpacked.

    from jobs.data import encode_examples, eval_prompt_ids
    encoded, stats = encode_examples(tokenizer, task_data.train, max_len=512, overlength="truncate")
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from jobs.task_data.errors import DatasetError
from jobs.task_data.example import Example

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass
class OverlengthStats:
    """What `encode_examples` did with rows longer than max_seq_len (and with chat templates that rewrite turns)."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    longest: int = 0  # tokens of the longest row before any cut
    template_fallbacks: int = 0  # rows trained on the last answer only (the template rewrites earlier turns)
    over: list[str] = field(default_factory=list)  # `where` of the first few rows over the limit

    @property
    def kept(self) -> int:
        return self.rows - self.dropped


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_pieces(tokenizer: Any, example: Example) -> tuple[list[tuple[str, bool]], bool]:
    """The rendered conversation as (text, trained) pieces, and whether the fallback was needed.

    Each trained assistant turn spans from the end of render(turns before it, generation prompt) to the end of
    render(turns up to it); both must be prefixes of the whole rendering. A template that rewrites earlier turns
    breaks that: then only the last answer is trained (the existing rendering's tail, or answer + eos)."""
    messages = [dict(m) for m in example.messages]
    full = _render(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if example.loss_turns == "last":
        turns = turns[-1:]
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i in turns:
        start, end = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1])
        if not (full.startswith(start) and full.startswith(end) and pos <= len(start) < len(end)):
            break
        pieces += [(full[pos : len(start)], False), (full[len(start) : len(end)], True)]
        pos = len(end)
    else:
        return [*pieces, (full[pos:], False)], False
    prompt = _render(tokenizer, messages[: turns[-1]], True)
    if full.startswith(prompt) and len(full) > len(prompt):
        tail = full[len(prompt) :]
    else:
        tail = messages[turns[-1]]["content"] + (tokenizer.eos_token or "")
    return [(prompt, False), (tail, True)], True


def render_example(tokenizer: Any, example: Example) -> tuple[Encoded, bool]:
    """The whole example as token ids and labels (no length limit); True when the template fallback was used."""
    eos = tokenizer.eos_token_id
    if example.mode == "completion":
        prompt_ids = tokenizer(example.prompt, add_special_tokens=True).input_ids
        answer = _ids(tokenizer, example.completion) + ([eos] if eos is not None else [])
        return Encoded(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer), False
    pieces, fallback = _chat_pieces(tokenizer, example)
    tokenized = [(_ids(tokenizer, text), trained) for text, trained in pieces if text]
    last = max(i for i, (_, trained) in enumerate(tokenized) if trained)
    special = set(tokenizer.all_special_ids)
    if eos is not None and not special.intersection(tokenized[last][0]):  # a template with no end-of-turn token
        tokenized[last] = ([*tokenized[last][0], eos], True)
    ids = [t for part, _ in tokenized for t in part]
    labels = [t if trained else IGNORE for part, trained in tokenized for t in part]
    return Encoded(ids, labels), fallback


def _fit(full: Encoded, max_len: int, overlength: str, where: str) -> tuple[Encoded | None, str]:
    """(encoded, "ok" | "truncated" | "dropped") under the overlength policy; raises DatasetError for "error"."""
    n = len(full.input_ids)
    if n <= max_len:
        return full, "ok"
    if overlength == "error":
        raise DatasetError(f"{where}: {n} tokens, longer than max_seq_len={max_len} (overlength: error); shorten "
                           "the row, raise training.max_seq_len, or set overlength: truncate or drop")  # fmt: skip
    if overlength == "drop":
        return None, "dropped"
    cut = Encoded(full.input_ids[:max_len], full.labels[:max_len])
    if all(label == IGNORE for label in cut.labels):  # the prompt alone fills max_len: nothing left to learn
        return None, "dropped"
    return cut, "truncated"


def encode_example(tokenizer: Any, example: Example, max_len: int, overlength: str = "truncate") -> Encoded | None:
    """Token ids and labels of one example within `max_len`: truncate (cut from the end; None if no trained token
    is left), drop (None) or error (DatasetError naming the row)."""
    return _fit(render_example(tokenizer, example)[0], max_len, overlength, example.where)[0]


def encode_examples(tokenizer: Any, examples: list[Example], max_len: int,
                    overlength: str = "truncate") -> tuple[list[Encoded], OverlengthStats]:  # fmt: skip
    """Encode every example; with overlength "error", one DatasetError counts and names the rows over the limit."""
    stats = OverlengthStats(rows=len(examples))
    kept: list[Encoded] = []
    too_long: list[str] = []
    for example in examples:
        full, fallback = render_example(tokenizer, example)
        stats.longest = max(stats.longest, len(full.input_ids))
        stats.template_fallbacks += fallback
        if len(full.input_ids) > max_len:
            too_long.append(f"{example.where} ({len(full.input_ids)} tokens)")
            if overlength == "error":
                continue
        encoded, status = _fit(full, max_len, "truncate" if overlength == "error" else overlength, example.where)
        stats.truncated += status == "truncated"
        stats.dropped += status == "dropped"
        if encoded is not None:
            kept.append(encoded)
    stats.over = too_long[:5]
    if too_long and overlength == "error":
        raise DatasetError(f"{len(too_long)} of {len(examples)} rows are longer than max_seq_len={max_len} "
                           f"(overlength: error): {', '.join(too_long[:5])}{' ...' if len(too_long) > 5 else ''}; "
                           "raise training.max_seq_len or set overlength: truncate or drop")  # fmt: skip
    if not kept:
        raise DatasetError(f"no example fits max_seq_len={max_len} ({stats.dropped} dropped); raise it")
    return kept, stats


def eval_prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    """The prompt the model answers at evaluation time; the same ids the server builds for the same request
    (chat: the messages before the last answer + the generation prompt; completion: the raw prompt)."""
    if example.mode == "chat":
        return _ids(tokenizer, _render(tokenizer, example.prompt_messages(), True))
    return tokenizer(example.prompt, add_special_tokens=True).input_ids


def prompt_text(tokenizer: Any, messages: list[dict]) -> str:
    """The chat template's rendering of `messages` followed by the assistant's generation prompt."""
    return _render(tokenizer, messages, True)


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
