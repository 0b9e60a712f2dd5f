"""Tests for split-level scoring (`score_split`), `is_lower_better`, and the reference checks run before training
(`check_references`, `label_balance`). Expected numbers are worked out by hand in comments; macro-F1 is also
checked against scikit-learn's `f1_score` on random labels.

Run: `pytest tests/test_metrics_split.py -q` (pure Python, about a second).
"""

from __future__ import annotations

import random

import pytest
from sklearn.metrics import f1_score

from jobs.metrics import NONE_LABEL, MetricResult, check_references, is_lower_better, label_balance, score_split
from jobs.task_config import MetricConfig


def metric(name: str, **options: object) -> MetricConfig:
    return MetricConfig(name=name, **options)


def test_choice_accuracy_and_macro_f1_by_hand() -> None:
    predictions = ["Yes.", "no", "maybe", "I say yes", "no"]
    references = ["yes", "no", "no", "no", "yes"]
    # mapped: yes, no, (none), yes, no; correct rows 0 and 1 -> accuracy 2/5 = 40
    # yes: TP 1 (row 0), FP 1 (row 3), FN 1 (row 4) -> 2/(2+1+1) = 0.5
    # no:  TP 1 (row 1), FP 1 (row 4), FN 2 (rows 2, 3) -> 2/(2+1+2) = 0.4; macro = 0.45; unmapped 1/5
    result = score_split(metric("choice", labels=["yes", "no"]), predictions, references)
    assert result.score == pytest.approx(40.0)
    assert result.details == pytest.approx({"accuracy": 40.0, "macro_f1": 45.0, "unmapped": 20.0})
    assert list(result.details) == ["accuracy", "macro_f1", "unmapped"]


def test_choice_label_set_from_references() -> None:
    # no labels: the set is {b, a}; "answer: b" holds exactly one label as a whole word ("answer" is no "a")
    result = score_split(metric("choice"), ["answer: b", "A."], ["b", "a"])
    assert result.details == pytest.approx({"accuracy": 100.0, "macro_f1": 100.0, "unmapped": 0.0})


def test_choice_reference_outside_labels_is_a_miss() -> None:
    # row 1's reference "maybe" is no label: wrong whatever the prediction; "no" has no rows and no predictions
    # so it has no F1 and is left out; yes: TP 1 -> F1 1 -> macro 100
    result = score_split(metric("choice", labels=["yes", "no"]), ["yes", "maybe"], ["yes", "maybe"])
    assert result.details == pytest.approx({"accuracy": 50.0, "macro_f1": 100.0, "unmapped": 50.0})


def test_choice_macro_f1_matches_scikit_learn() -> None:
    rng = random.Random(0)
    labels = ["a", "b", "c", "d", "e"]  # "e" never occurs: left out by both
    gold = [rng.choice("abcd") for _ in range(300)]
    predictions = [rng.choice(["a", "b", "c", "d", "something else"]) if rng.random() < 0.5 else g for g in gold]
    result = score_split(metric("choice", labels=labels), predictions, gold)
    mapped = [p if p in labels else NONE_LABEL for p in predictions]
    seen = [label for label in labels if label in gold or label in mapped]
    expected = 100 * f1_score(gold, mapped, labels=seen, average="macro", zero_division=0)
    assert result.details["macro_f1"] == pytest.approx(expected, abs=1e-9)
    assert 40 < result.details["macro_f1"] < 90  # a mix of hits and misses, not a degenerate case
    assert result.score == pytest.approx(100 * sum(m == g for m, g in zip(mapped, gold, strict=True)) / 300)


def test_score_split_other_metrics_by_hand() -> None:
    em = score_split(metric("exact_match"), ["A", "b", "c"], ["a", "b", "x"])  # 2 of 3
    assert em == MetricResult(pytest.approx(200 / 3), {"exact_match": pytest.approx(200 / 3)})
    # row 0: P 1, R 1/2 -> 2/3; row 1: no JSON -> 0; mean 1/3; one of two predictions parsed
    js = score_split(metric("json_fields"), ['{"a": 1}', "junk"], ['{"a": 1, "b": 2}', '{"a": 1}'])
    assert js.details == pytest.approx({"field_f1": 100 / 3, "parsed": 50.0})
    num = score_split(metric("numeric"), ["1,000", "about -2", "none"], ["1000", "-2.0", "3"])  # 2 of 3
    assert num.details == pytest.approx({"accuracy": 200 / 3, "parsed": 200 / 3})
    # row 0: "42" = "42"; row 1: "41" vs "42" (extracted from the reference); row 2: no match
    rx = score_split(metric("regex", pattern=r"####\s*(\S+)"), ["so #### 42", "#### 41", "42"], ["42", "#### 42", "42"])
    assert rx.details == pytest.approx({"exact_match": 100 / 3, "matched": 200 / 3})
    rl = score_split(metric("rouge_l"), ["the cat sat on the mat", "a b c d"], ["the cat is on the mat", "a c e"])
    assert rl.score == pytest.approx(100 * (5 / 6 + 4 / 7) / 2)  # per-row values as in tests/test_metrics.py
    assert rl.details == {"rouge_l": rl.score}


def test_score_split_json_fields_option() -> None:
    result = score_split(metric("json_fields", fields=["a"]), ['{"a": 1, "x": 9}'], ['{"a": 1, "b": 2}'])
    assert result.score == 100.0


def test_score_split_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="eval_loss is scored from the model's mean loss"):
        score_split(metric("eval_loss"), ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_split(metric("exact_match"), ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="eval split is empty"):
        score_split(metric("exact_match"), [], [])
    with pytest.raises(ValueError, match="json_fields: reference row 1: reference is not a JSON object"):
        score_split(metric("json_fields"), ["{}", "{}"], ["{}", "oops"])
    with pytest.raises(ValueError, match="numeric: reference row 0: reference has no number"):
        score_split(metric("numeric"), ["1"], ["n/a"])


def test_is_lower_better() -> None:
    assert is_lower_better(metric("eval_loss"))
    assert not any(is_lower_better(metric(n)) for n in ("exact_match", "choice", "json_fields", "rouge_l", "numeric"))


def test_check_choice_one_class() -> None:
    assert check_references(metric("choice"), ["yes", "Yes.", " yes"]) == [
        "choice: the references hold one class ('yes', 3 rows); a label set with one class cannot measure a "
        "classifier: add rows of the other labels"
    ]


def test_check_choice_references_outside_labels() -> None:
    refs = ["yes", "no", "Maybe", "maybe", "perhaps", "YES"]
    assert check_references(metric("choice", labels=["yes", "no"]), refs) == [
        "choice: 3 references are not in labels [yes, no]: 'Maybe' (2), 'perhaps' (1)"
    ]
    many = ["yes", "no"] + [f"other{i}" for i in range(7)]
    (problem,) = check_references(metric("choice", labels=["yes", "no"]), many)
    assert problem.startswith("choice: 7 references are not in labels [yes, no]: 'other0' (1), ")
    assert problem.count("'other") == 5 and problem.endswith(" and 2 more")


def test_check_choice_unseen_label_is_a_warning() -> None:
    assert check_references(metric("choice", labels=["yes", "no", "maybe"]), ["yes", "no"]) == [
        "warning: choice: labels never seen in the references: maybe"
    ]


def test_check_json_fields() -> None:
    assert check_references(metric("json_fields"), ['{"a": 1}', "nope", "[1]"]) == [
        "json_fields: references that are not JSON objects: 2 rows (first: row 1: 'nope')"
    ]
    assert check_references(metric("json_fields", fields=["a", "B"]), ['{"a": 1}', '{"a": 2, "b": 3}']) == [
        "warning: json_fields: field 'B' is missing in 1 row (first: row 0: '{\"a\": 1}')"
    ]


def test_check_numeric_and_regex() -> None:
    assert check_references(metric("numeric"), ["5", "five", "-1,000"]) == [
        "numeric: references without a number: 1 row (first: row 1: 'five')"
    ]
    answer = metric("regex", pattern=r"Answer:\s*(\w)")
    (problem,) = check_references(answer, ["B", "C"])
    assert problem.startswith("warning: regex: pattern 'Answer:\\\\s*(\\\\w)' matches no reference")
    assert check_references(answer, ["B", "Answer: C"]) == []  # matching some references is enough


def test_check_empty_and_clean_references() -> None:
    assert check_references(metric("exact_match"), []) == [
        "exact_match: no references to score against (the eval split is empty)"
    ]
    assert check_references(metric("rouge_l"), ["fine", "  "]) == [
        "warning: rouge_l: empty references: 1 row (first: row 1: '  ')"
    ]
    assert check_references(metric("eval_loss"), []) == []  # scored from the loss
    assert check_references(metric("exact_match"), ["a", "b"]) == []
    assert check_references(metric("choice"), ["a", "b", "a"]) == []
    assert check_references(metric("json_fields"), ['{"a": 1}']) == []
    assert check_references(metric("numeric"), ["1", "2.5e3"]) == []


def test_long_examples_are_shortened() -> None:
    (problem,) = check_references(metric("numeric"), ["x" * 200])
    assert problem == f"numeric: references without a number: 1 row (first: row 0: '{'x' * 57}...')"


def test_label_balance() -> None:
    assert label_balance(metric("choice"), ["yes", "no", "yes", " Yes."]) == {"yes": 3, "no": 1}
    refs = ["yes", "yes", "no", "other"]
    assert label_balance(metric("choice", labels=["no", "yes", "maybe"]), refs) == {
        "no": 1,
        "yes": 2,
        "maybe": 0,
        "other": 1,
    }
    with pytest.raises(ValueError, match="label balance is for metric choice, not exact_match"):
        label_balance(metric("exact_match"), refs)
