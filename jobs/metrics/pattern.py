"""The regex metric: a pattern extracts the answer from the prediction (and from the reference when it matches
there), then the two are compared by exact match.

    from jobs.metrics.pattern import regex_match
    regex_match("Reasoning... Answer: B", "B", pattern=r"Answer:\\s*(\\w+)")   # 1.0
"""

from __future__ import annotations

import re

from jobs.metrics.text import exact_match


def extract_answer(text: str, pattern: str | re.Pattern[str]) -> str | None:
    """`re.search` the pattern in `text`: group 1 if the pattern has groups (an unmatched group gives ""), else the
    whole match; None when it does not match."""
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    match = compiled.search(text)
    if match is None:
        return None
    return (match.group(1) or "") if compiled.groups else match.group(0)


def regex_match(prediction: str, reference: str, pattern: str | re.Pattern[str]) -> float:
    """Exact match of the answer extracted from the prediction against the reference (extracted the same way if
    the pattern matches it, else as written). No match in the prediction scores 0.0."""
    answer = extract_answer(prediction, pattern)
    if answer is None:
        return 0.0
    extracted = extract_answer(reference, pattern)
    return exact_match(answer, reference if extracted is None else extracted)
