"""Task `sentiment` (classification, exact match): a short product review -> positive | negative | mixed.

Reviews are composed from generic praise/complaint clauses; `mixed` reviews hold one of each, joined by a contrast.
Registered in `jobs.tasks`; regenerate data with `python -m jobs.tasks.generate`.
"""

from __future__ import annotations

import random

from jobs.tasks.common import capitalise, unique_rows

NAME = "sentiment"
KIND = "classification"
METRIC = "exact_match"
INSTRUCTION = (
    "Classify the sentiment of the product review. Answer with exactly one word: positive, negative or mixed. "
    "Use mixed when the review both praises and criticises the product."
)
LABELS = ("positive", "negative", "mixed")

PRODUCTS = (
    "headphones", "blender", "laptop", "backpack", "coffee maker", "phone case", "desk lamp", "kettle",
    "vacuum cleaner", "tent", "keyboard", "water bottle", "smartwatch", "air fryer", "office chair", "toaster",
    "monitor", "rice cooker", "speaker", "umbrella",
)  # fmt: skip
PRAISE = (
    "it works perfectly", "the build quality is excellent", "setup took two minutes", "it arrived a day early",
    "the price was a steal", "customer support was friendly and fast", "it looks even better than in the photos",
    "it is surprisingly quiet", "it feels sturdy and well made", "it does exactly what it promises",
    "my whole family loves it", "it is easy to clean", "the design is really clever", "it is light and compact",
)  # fmt: skip
COMPLAINTS = (
    "it stopped working after a week", "the build feels cheap and flimsy", "the instructions were useless",
    "it arrived scratched", "it is far too expensive for what it does", "support never answered my emails",
    "it looks nothing like the photos", "it is unbearably loud", "a part snapped on the first day",
    "it does not do what it promises", "it is a pain to clean", "the buttons are badly placed",
    "it is heavy and bulky", "it smells like burnt plastic",
)  # fmt: skip
OPENERS = ("", "I bought this {p} last month. ", "Got the {p} as a gift. ", "Review of the {p}: ", "This {p}: ")
POS_CLOSERS = ("", " Would buy again.", " Highly recommended.", " Five stars.")
NEG_CLOSERS = ("", " Avoid.", " Returning it.", " One star.")
MIXED_JOINS = ("{a}, but {b}.", "{a}; however, {b}.", "{a}, although {b}.", "{a}. On the other hand, {b}.")


def _single(rng: random.Random, clauses: tuple[str, ...], closers: tuple[str, ...]) -> str:
    picked = rng.sample(clauses, rng.choice((1, 2)))
    body = capitalise(" and ".join(picked)) + "."
    return body + rng.choice(closers)


def _mixed(rng: random.Random) -> str:
    good, bad = rng.choice(PRAISE), rng.choice(COMPLAINTS)
    first, second = (good, bad) if rng.random() < 0.5 else (bad, good)
    return capitalise(rng.choice(MIXED_JOINS).format(a=first, b=second))


def make_one(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(LABELS)
    opener = rng.choice(OPENERS).format(p=rng.choice(PRODUCTS))
    if label == "positive":
        body = _single(rng, PRAISE, POS_CLOSERS)
    elif label == "negative":
        body = _single(rng, COMPLAINTS, NEG_CLOSERS)
    else:
        body = _mixed(rng)
    return opener + body, label


def make_rows(rng: random.Random, n: int) -> list[dict]:
    return unique_rows(rng, n, make_one, NAME)
