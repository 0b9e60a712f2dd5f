"""The numeric metric: the first number in the prediction, within a relative tolerance of the reference's number.

    from jobs.metrics.numeric import first_number, numeric_match
    first_number("Total: -1,234.5 USD")                     # -1234.5
    numeric_match("about 3.1416", "3.14159", tolerance=1e-4)  # 1.0 (|diff| 1e-5 <= 1e-4 * max(1, 3.14159))

Numbers: an optional sign (+, -, or U+2212 minus; a sign right after a letter or digit, as in "item-5" or "3-5", is
a hyphen, not a sign), digits with optional comma thousands separators ("1,234,567": groups of exactly three), an
optional decimal part after a period, an optional exponent ("1.5e-3"), or a bare fraction (".5"). A comma is never
a decimal point ("1,5" is 1).
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(
    r"(?P<sign>[-+\u2212])?"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
)


def first_number(text: str) -> float | None:
    """The first number in `text` as a float (see the module docstring for what counts), or None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match["body"].replace(",", ""))
    start = match.start()
    hyphen = start > 0 and text[start - 1].isalnum()  # "item-5": the "-" joins words, it is no sign
    if match["sign"] in ("-", "\u2212") and not hyphen:
        value = -value
    return value


def numbers_match(prediction: float, reference: float, tolerance: float) -> bool:
    """|prediction - reference| <= tolerance * max(1, |reference|); infinities and NaN only equal themselves."""
    if not (math.isfinite(prediction) and math.isfinite(reference)):
        return prediction == reference
    return abs(prediction - reference) <= tolerance * max(1.0, abs(reference))


def numeric_match(prediction: str, reference: str, tolerance: float = 1e-6) -> float:
    """1.0 when the first number in the prediction is within tolerance of the reference's, else 0.0.

    A prediction without a number scores 0.0; a reference without one raises ValueError.
    """
    ref = first_number(reference)
    if ref is None:
        raise ValueError(f"reference has no number: {reference[:80]!r}")
    pred = first_number(prediction)
    return 1.0 if pred is not None and numbers_match(pred, ref, tolerance) else 0.0
