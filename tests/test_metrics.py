"""Tests for jobs.metrics (normalisation, exact match, JSON fields, ROUGE-L basics, `score`, the CLI) on hand-made
cases; every expected number is worked out by hand in a comment. More: tests/test_metrics_{rows,split,rouge}.py.

Run: `pytest tests/test_metrics.py -q` (pure Python, well under a second).
"""

from __future__ import annotations

import pytest

from jobs.metrics import (
    exact_match,
    first_json_object,
    json_field_f1,
    lcs_length,
    normalise_text,
    rouge_l,
    score,
    word_tokens,
)
from jobs.metrics.__main__ import main
from jobs.task_config import MetricConfig


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Positive. ", "positive"),
        ("A  b\n\tC", "a b c"),
        ("ends with two..", "ends with two."),  # only one trailing period goes
        ("3.5", "3.5"),  # inner periods stay
        ("Hello .", "hello"),  # the space left before the removed period goes too
        ("", ""),
    ],
)
def test_normalise_text(text: str, expected: str) -> None:
    assert normalise_text(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Positive.", "positive", 1.0),
        ("  2021-03-05 \n", "2021-03-05", 1.0),
        ("SELECT  name\nFROM employees", "select name from employees", 1.0),
        ("positive!", "positive", 0.0),
        ("x..", "x.", 0.0),  # "x." vs "x"
        ("The answer is 9", "9", 0.0),
        ("", "9", 0.0),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: float) -> None:
    assert exact_match(prediction, reference) == expected


def test_first_json_object_skips_junk_and_unparseable_braces() -> None:
    assert first_json_object('Sure! {not json} then {"a": {"b": 1}} and {"c": 2}') == {"a": {"b": 1}}
    assert first_json_object("[1, 2]") is None
    assert first_json_object('{"a": 1') is None


REF = '{"name": "Sam", "item": "oat latte", "size": "large", "quantity": 2}'


def test_json_f1_partial_match() -> None:
    # prediction pairs: name=sam (hit), item=latte (miss), size=large (hit) -> 2 of 3 predicted, 2 of 4 reference
    # P = 2/3, R = 1/2, F1 = 2PR / (P + R) = (2/3) / (7/6) = 4/7
    pred = '{"name": "Sam", "item": "latte", "size": "large"}'
    assert json_field_f1(pred, REF) == pytest.approx(4 / 7)


def test_json_f1_wrong_values_and_extra_keys() -> None:
    # hits: name, item -> 2; predicted 5 pairs, reference 4: P = 2/5, R = 2/4, F1 = 2*(1/5)/(9/10) = 4/9
    pred = '{"name": "Sam", "item": "oat latte", "size": "small", "quantity": 3, "note": "hot"}'
    assert json_field_f1(pred, REF) == pytest.approx(4 / 9)


def test_json_f1_junk_around_and_value_normalisation() -> None:
    # code fences around the object; case, whitespace, trailing period and "2" vs 2 / 2.0 all normalise away
    pred = 'Here you go:\n```json\n{"name": " SAM ", "item": "Oat  latte.", "size": "large", "quantity": "2"}\n```'
    assert json_field_f1(pred, REF) == 1.0
    assert json_field_f1('{"quantity": 2.0}', '{"quantity": 2}') == 1.0
    assert json_field_f1('{"ok": true}', '{"ok": "true"}') == 1.0


@pytest.mark.parametrize("pred", ["no json here", '{"name": "Sam"', "[1, 2, 3]", ""])
def test_json_f1_invalid_prediction_scores_zero(pred: str) -> None:
    assert json_field_f1(pred, REF) == 0.0


def test_json_f1_empty_objects() -> None:
    assert json_field_f1("{}", "{}") == 1.0
    assert json_field_f1("{}", REF) == 0.0
    assert json_field_f1(REF, "{}") == 0.0


def test_json_f1_rejects_bad_reference() -> None:
    with pytest.raises(ValueError, match="reference is not a JSON object"):
        json_field_f1("{}", "not json")


def test_word_tokens() -> None:
    assert word_tokens("Role-playing game, for PC!") == ["role", "playing", "game", "for", "pc"]
    assert word_tokens("snake_case 2021") == ["snake", "case", "2021"]


def test_lcs_length_classic() -> None:
    # ABCBDAB vs BDCABA: a longest common subsequence is BCBA (length 4)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_hand_computed() -> None:
    # "the cat sat on the mat" vs "the cat is on the mat": LCS = the cat on the mat = 5, P = R = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # pred a b c d (4), ref a c e (3): LCS = a c = 2, P = 1/2, R = 2/3, F = 2*(1/3)/(7/6) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    # order matters: LCS of "b a" and "a b" is 1 -> P = R = 1/2
    assert rouge_l("b a", "a b") == pytest.approx(0.5)


def test_rouge_l_case_punctuation_and_empty() -> None:
    assert rouge_l("Hello, World!", "hello world") == 1.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "something") == 0.0
    assert rouge_l("nothing shared", "other words") == 0.0


def test_score_dispatch() -> None:
    assert score("exact_match", "Mixed.", "mixed") == 1.0
    assert score("json_f1", '{"a": 1}', '{"a": 1, "b": 2}') == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert score("json_fields", '{"a": 1}', '{"a": 1, "b": 2}') == pytest.approx(2 / 3)  # the same metric
    assert score("rouge_l", "a b c d", "a c e") == pytest.approx(4 / 7)
    assert score("numeric", "x = 2.0000001", "2") == 1.0  # |diff| 1e-7 <= 1e-6 * 2 (default tolerance)
    assert score("numeric", "x = 2.00001", "2") == 0.0  # 1e-5 > 2e-6
    assert score("choice", "Yes.", "yes") == 1.0
    assert score("choice", "yes, I think", "yes") == 0.0  # no label set given: only the normalised exact match
    with pytest.raises(ValueError, match="unknown metric 'bleu'; known: exact_match, choice, json_fields, json_f1"):
        score("bleu", "a", "a")
    with pytest.raises(ValueError, match="regex needs a pattern"):
        score("regex", "a", "a")
    with pytest.raises(ValueError, match="eval_loss is scored from the model's loss"):
        score("eval_loss", "a", "a")


def test_score_with_metric_config() -> None:
    assert score(MetricConfig(name="json_fields", fields=["a"]), '{"a": 1}', '{"a": 1, "b": 2}') == 1.0
    assert score(MetricConfig(name="numeric", tolerance=0.01), "about 101", "100") == 1.0  # 1 <= 0.01 * 100
    assert score(MetricConfig(name="numeric", tolerance=0.01), "about 102", "100") == 0.0
    assert score(MetricConfig(name="regex", pattern=r"Answer:\s*(\w+)"), "so... Answer: B", "B") == 1.0
    assert score(MetricConfig(name="choice", labels=["yes", "no"]), "I'd say yes", "yes") == 1.0


def test_json_fields_restricted_to_fields() -> None:
    ref = '{"a": 1, "b": 2, "c": 3}'
    pred = '{"a": 1, "b": 5, "d": 4}'
    # all keys: pred {a=1, b=5, d=4}, ref {a=1, b=2, c=3}: overlap 1, P = R = 1/3 -> F1 = 1/3
    assert json_field_f1(pred, ref) == pytest.approx(1 / 3)
    # fields a, b: pred {a=1, b=5}, ref {a=1, b=2}: P = R = 1/2 -> 1/2 (c and d no longer count)
    assert json_field_f1(pred, ref, fields=["a", "b"]) == pytest.approx(0.5)
    assert json_field_f1(pred, ref, fields=["A"]) == 1.0  # field names compare like keys (case-insensitive)
    assert json_field_f1(pred, ref, fields=["z"]) == 1.0  # absent from both: nothing to disagree on
    assert json_field_f1('{"z": 1}', ref, fields=["z"]) == 0.0  # predicted a field the reference lacks


def test_cli_prints_the_score(capsys: pytest.CaptureFixture[str]) -> None:
    main(["rouge_l", "the cat sat on the mat", "the cat is on the mat"])
    main(["choice", "I think positive", "positive", "--labels", "positive,negative"])
    main(["numeric", "about 1,001", "1000", "--tolerance", "0.01"])
    main(["regex", "Answer: B", "b", "--pattern", r"Answer:\s*(\w)"])
    assert capsys.readouterr().out.split() == ["0.8333", "1.0000", "1.0000", "1.0000"]


def test_cli_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["regex", "a", "a"])
    assert exit_info.value.code == 2
    assert "pattern: metric regex needs a pattern" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["exact_match", "a", "a", "--labels", "x,y"])
    assert "labels: only for metric choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["json_fields", "{}", "not json"])
    assert "reference is not a JSON object" in capsys.readouterr().err
