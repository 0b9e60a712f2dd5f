"""Tests for the per-row scorers of jobs.metrics added for user tasks: numeric, regex and choice (label mapping).
Every expected value is worked out by hand in a comment.

Run: `pytest tests/test_metrics_rows.py -q` (pure Python, under a second).
"""

from __future__ import annotations

import math

import pytest

from jobs.metrics import (
    NONE_LABEL,
    LabelSet,
    choice_match,
    extract_answer,
    first_number,
    numeric_match,
    regex_match,
    scorer,
)
from jobs.task_config import MetricConfig


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42.0),
        ("The answer is -3.5.", -3.5),  # the trailing period is punctuation, not a decimal point
        ("1,234", 1234.0),
        ("$1,234,567.89 total", 1234567.89),
        ("1.5e3 m", 1500.0),
        ("2E-2", 0.02),
        ("+7", 7.0),
        ("\u22124", -4.0),  # U+2212 MINUS SIGN
        (".5", 0.5),
        ("-.25", -0.25),
        ("12,3456", 12.0),  # "3456" is no group of three: the comma ends the number
        ("1,5", 1.0),  # a comma is never a decimal point
        ("item-5", 5.0),  # a "-" right after a letter is a hyphen
        ("x = -5", -5.0),
        ("3-5 people", 3.0),  # the first number
        ("3 eggs", 3.0),  # "e" without exponent digits is not an exponent
        ("v1.2.3", 1.2),
        ("one hundred", None),
        ("", None),
    ],
)
def test_first_number(text: str, expected: float | None) -> None:
    assert first_number(text) == expected


def test_first_number_overflow_is_infinite() -> None:
    assert first_number("1e999") == math.inf


@pytest.mark.parametrize(
    ("prediction", "reference", "tolerance", "expected"),
    [
        ("about 3.1416", "3.14159", 1e-4, 1.0),  # |diff| 1e-5 <= 1e-4 * 3.14159
        ("3.15", "3.14159", 1e-4, 0.0),  # 0.00841 > 3.1e-4
        ("0.0000005", "0", 1e-6, 1.0),  # small references: tolerance is absolute below |ref| = 1: 5e-7 <= 1e-6
        ("0.000002", "0", 1e-6, 0.0),  # 2e-6 > 1e-6
        ("1,000,500", "1000000", 1e-3, 1.0),  # 500 <= 1e-3 * 1e6
        ("1,002,000", "1,000,000", 1e-3, 0.0),  # 2000 > 1000
        ("2.0000001", "2", 1e-6, 1.0),  # 1e-7 <= 2e-6
        ("2.00001", "2", 1e-6, 0.0),  # 1e-5 > 2e-6
        ("-5", "5", 1e-6, 0.0),
        ("3 or 4", "4", 1e-6, 0.0),  # only the first number counts
        ("The total is 1.2e3 dollars", "1200", 0.0, 1.0),
        ("no number here", "5", 1e-6, 0.0),
        ("1e999", "1e999", 1e-6, 1.0),  # infinities equal only themselves
        ("1e308", "1e999", 1e-6, 0.0),
    ],
)
def test_numeric_match(prediction: str, reference: str, tolerance: float, expected: float) -> None:
    assert numeric_match(prediction, reference, tolerance) == expected


def test_numeric_reference_without_number_is_an_error() -> None:
    with pytest.raises(ValueError, match="reference has no number: 'five'"):
        numeric_match("5", "five")


ANSWER = r"Answer:\s*(\w+)"


def test_extract_answer() -> None:
    assert extract_answer("Let me think. Answer: B because", ANSWER) == "B"  # group 1
    assert extract_answer("on 2021-03-05 or 2022-01-01", r"\d{4}-\d{2}-\d{2}") == "2021-03-05"  # whole match
    assert extract_answer("Answer: ", r"Answer:\s*(\w+)?") == ""  # the group took part in no match
    assert extract_answer("no answer", ANSWER) is None


@pytest.mark.parametrize(
    ("prediction", "reference", "pattern", "expected"),
    [
        ("Reasoning first. Answer: B", "B", ANSWER, 1.0),
        ("Answer: b", "Thinking... Answer: B", ANSWER, 1.0),  # the reference is extracted too when it matches
        ("Answer: C", "B", ANSWER, 0.0),
        ("B", "B", ANSWER, 0.0),  # no match in the prediction scores 0 even if the text equals the reference
        ("Answer: Paris.", "paris", r"Answer:\s*(.+)", 1.0),  # exact-match normalisation after extraction
        ("Date: 2021-03-05 ok", "2021-03-05", r"\d{4}-\d{2}-\d{2}", 1.0),
        ("#### 1,234", "#### 1234", r"####\s*(\S+)", 0.0),  # compared as text: "1,234" != "1234"
    ],
)
def test_regex_match(prediction: str, reference: str, pattern: str, expected: float) -> None:
    assert regex_match(prediction, reference, pattern) == expected


SENTIMENT = LabelSet(["positive", "negative", "neutral"])


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Positive.", "positive"),  # normalised exact match
        ("  NEUTRAL ", "neutral"),
        ("I'd say it is negative overall", "negative"),  # the only label occurring as a whole word
        ("positive or negative", NONE_LABEL),  # two labels occur
        ("nonnegative", NONE_LABEL),  # inside a word does not count
        ("great", NONE_LABEL),
        ("", NONE_LABEL),
    ],
)
def test_label_mapping(prediction: str, expected: str) -> None:
    assert SENTIMENT.map(prediction) == expected


def test_label_mapping_multiword_and_symbols() -> None:
    labels = LabelSet(["very positive", "positive"])
    assert labels.map("Very positive.") == "very positive"  # exact match wins over the word rule
    assert labels.map("it is very positive") == NONE_LABEL  # both labels occur as whole words
    assert labels.map("it is positive") == "positive"
    assert LabelSet(["c++", "java"]).map("I pick C++ here") == "c++"  # regex metacharacters are escaped


def test_label_set_keeps_first_spelling() -> None:
    labels = LabelSet(["Billing", "bug", "billing."])
    assert labels.labels == ["Billing", "bug"]  # "billing." normalises to the same label
    assert labels.map("billing") == "Billing"
    assert labels.canonical(" BILLING. ") == "Billing"
    assert labels.canonical("refund") is None


def test_choice_match() -> None:
    assert choice_match("I think positive", "positive", ["positive", "negative"]) == 1.0
    assert choice_match("I think positive", "negative", ["positive", "negative"]) == 0.0
    assert choice_match("I think positive", "positive") == 0.0  # no label set: exact match only
    assert choice_match("Positive.", "positive") == 1.0
    assert choice_match("positive", "maybe", ["positive", "negative"]) == 0.0  # reference outside the set


def test_choice_scorer_takes_the_label_set_from_references() -> None:
    choice = MetricConfig(name="choice")
    assert scorer(choice, references=["yes", "no"])("I say yes", "yes") == 1.0
    assert scorer(choice)("I say yes", "yes") == 0.0  # no set: exact match only
    assert scorer(MetricConfig(name="choice", labels=["yes", "no"]), references=["x"])("I say yes", "yes") == 1.0


def test_eval_loss_has_no_row_scorer() -> None:
    with pytest.raises(ValueError, match="eval_loss is scored from the model's loss on the eval split"):
        scorer(MetricConfig(name="eval_loss"))
