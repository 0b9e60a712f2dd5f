"""The benchmark's workload: fixed prompts, random PEFT adapters, and the request-to-adapter assignment.

Every case of a benchmark run decodes the same prompts for the same number of new tokens, so tokens/s compare
like for like; only the adapter assignment (none, or N adapters round-robin) changes between cases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.lora_files import BaseShapes
from adapters.random_adapter import write_random_adapter

_TOPICS = ("a cat", "the sea", "rain in the city", "a robot", "the moon", "old trains", "coffee", "a lighthouse",
           "winter mornings", "a lost key", "mountain roads", "a small bakery")  # fmt: skip
_ASKS = ("Write a haiku about {t}.", "Tell me a short story about {t}.", "List three facts about {t}.",
         "Why do people like {t}? Explain it to a child, briefly.", "Describe {t} in one sentence.",
         "Give me a title for a poem about {t}, and say why it fits.")  # fmt: skip


@dataclass(frozen=True)
class Workload:
    """One benchmark case: prompt ids, the adapter of each request (None = base model), new tokens per request."""

    name: str
    prompts: list[list[int]]
    adapters: list[str | None]
    max_new_tokens: int

    @property
    def requests(self) -> int:
        return len(self.prompts)

    @property
    def generated_tokens(self) -> int:
        return self.requests * self.max_new_tokens

    @property
    def distinct_adapters(self) -> int:
        return len({a for a in self.adapters if a is not None})

    def with_adapters(self, name: str, adapters: list[str | None]) -> Workload:
        return Workload(name, self.prompts, adapters, self.max_new_tokens)

    def shortened(self, max_new_tokens: int) -> Workload:
        """The same requests with fewer new tokens (for warm-up)."""
        return Workload(self.name, self.prompts, self.adapters, max_new_tokens)


def chat_prompts(tokenizer: Any, count: int, seed: int = 0) -> list[list[int]]:
    """`count` chat-templated prompts of varied length, deterministic for a seed."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        text = rng.choice(_ASKS).format(t=rng.choice(_TOPICS))
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        prompts.append(list(tokenizer(chat, add_special_tokens=False).input_ids))
    return prompts


def round_robin(requests: int, names: list[str]) -> list[str | None]:
    """Request i uses adapter names[i % N]; an empty list means every request runs on the base model."""
    return [names[i % len(names)] if names else None for i in range(requests)]


def adapter_names(count: int) -> list[str]:
    return [f"bench-{i:03d}" for i in range(count)]


def write_adapters(root: Path, shapes: BaseShapes, count: int, rank: int, seed: int = 0) -> dict[str, Path]:
    """`count` random rank-`rank` PEFT adapters on all seven projections, one folder each under `root`."""
    return {
        name: write_random_adapter(root / name, shapes, rank=rank, seed=seed + i, scale=0.5)
        for i, name in enumerate(adapter_names(count))
    }
