"""Task `word_math` (arithmetic, exact match): a one- or two-step word problem with small numbers -> `<calculation> = <n>`.

Problem kinds: add, subtract, multiply (single digits), share equally (exact division), add-then-subtract.
The output is the calculation with the problem's numbers in order, then the integer result: `27 - 3 = 24`.
Why not the bare integer: SmolLM2-135M cannot add in one token jump (1% when forced to answer with a bare number;
36% when it writes the calculation first), and a 60-step LoRA on bare-integer answers only learned to say "12".
Registered in `jobs.tasks`; regenerate data with `python -m jobs.tasks.generate`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from jobs.tasks.common import unique_rows

NAME = "word_math"
KIND = "arithmetic"
METRIC = "exact_match"
INSTRUCTION = (
    "Solve the math word problem. Answer with one line: the calculation with the numbers from the problem, "
    "then = and the integer result, for example 12 + 5 = 17. No words."
)

PEOPLE = (
    "Tom", "Ana", "Ravi", "Lena", "Max", "Sara", "Jin", "Noah", "Ella", "Omar", "Mia", "Leo", "Zoe", "Ivan",
    "Nora", "Sam",
)  # fmt: skip
OBJECTS = (
    "apples", "marbles", "stickers", "pencils", "cookies", "stamps", "books", "shells", "cards", "balloons",
    "oranges", "coins",
)  # fmt: skip


def _add(rng: random.Random, who: str, obj: str) -> tuple[str, str]:
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    text = rng.choice(
        (
            f"{who} has {a} {obj}. {who} gets {b} more. How many {obj} does {who} have now?",
            f"{who} picked {a} {obj} in the morning and {b} in the afternoon. How many {obj} did {who} pick?",
            f"There are {a} {obj} in a box and {b} in a bag. How many {obj} are there altogether?",
        )
    )
    return text, f"{a} + {b} = {a + b}"


def _subtract(rng: random.Random, who: str, obj: str) -> tuple[str, str]:
    a = rng.randint(5, 30)
    b = rng.randint(1, a - 1)
    text = rng.choice(
        (
            f"{who} had {a} {obj} and gave {b} to a friend. How many {obj} does {who} have left?",
            f"{who} bought {a} {obj} and lost {b} of them. How many {obj} are left?",
            f"A jar holds {a} {obj}. {who} takes out {b}. How many {obj} are still in the jar?",
        )
    )
    return text, f"{a} - {b} = {a - b}"


def _multiply(rng: random.Random, who: str, obj: str) -> tuple[str, str]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    text = rng.choice(
        (
            f"{who} buys {a} bags with {b} {obj} in each bag. How many {obj} does {who} buy?",
            f"There are {a} boxes and each box holds {b} {obj}. How many {obj} are there in total?",
        )
    )
    return text, f"{a} * {b} = {a * b}"


def _share(rng: random.Random, who: str, obj: str) -> tuple[str, str]:
    each, people = rng.randint(2, 9), rng.randint(2, 6)
    text = f"{who} shares {each * people} {obj} equally among {people} friends. How many {obj} does each friend get?"
    return text, f"{each * people} / {people} = {each}"


def _add_subtract(rng: random.Random, who: str, obj: str) -> tuple[str, str]:
    a, b = rng.randint(2, 20), rng.randint(2, 15)
    c = rng.randint(1, a + b - 1)
    text = f"{who} has {a} {obj}, gets {b} more and then gives away {c}. How many {obj} does {who} have now?"
    return text, f"{a} + {b} - {c} = {a + b - c}"


KINDS: tuple[Callable[[random.Random, str, str], tuple[str, str]], ...] = (
    _add, _subtract, _multiply, _share, _add_subtract,
)  # fmt: skip


def make_one(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(KINDS)
    return kind(rng, rng.choice(PEOPLE), rng.choice(OBJECTS))


def make_rows(rng: random.Random, n: int) -> list[dict]:
    return unique_rows(rng, n, make_one, NAME)
