"""Helpers shared by the task generators in `jobs/tasks/*.py` (no task logic here, nothing runs on import).

Used as `from jobs.tasks.common import unique_rows`; run the suite's tests with `pytest tests/test_tasks.py`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# A generator of one example: draws from the rng, returns (input, output).
MakeOne = Callable[[random.Random], tuple[str, str]]


def unique_rows(rng: random.Random, n: int, make_one: MakeOne, prefix: str, max_tries: int = 200) -> list[dict]:
    """Draw examples with `make_one` until `n` distinct inputs; rows are {"id", "input", "output"}.

    Raises RuntimeError when `max_tries * n` draws do not give `n` distinct inputs (input space too small).
    """
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(max(max_tries * n, max_tries)):
        if len(rows) == n:
            break
        text, output = make_one(rng)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"id": f"{prefix}-{len(rows):04d}", "input": text, "output": output})
    if len(rows) < n:
        raise RuntimeError(f"{prefix}: only {len(rows)} distinct inputs after many draws, wanted {n}")
    return rows


def join_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def capitalise(text: str) -> str:
    """Upper-case the first character only (unlike str.capitalize, keeps the rest as is)."""
    return text[:1].upper() + text[1:]
