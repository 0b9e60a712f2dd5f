"""Text normalisation and the exact-match metric (the comparison every string metric of jobs.metrics builds on).

from jobs.metrics.text import exact_match
exact_match("Positive.", "positive")   # 1.0
"""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Strip, collapse inner whitespace to one space, lowercase, and drop one trailing period."""
    text = _WS.sub(" ", text.strip()).lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both strings are equal after `normalise_text`, else 0.0."""
    return 1.0 if normalise_text(prediction) == normalise_text(reference) else 0.0
