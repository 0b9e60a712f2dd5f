"""Scoring a whole eval split: `score_split(metric, predictions, references)` -> MetricResult (0-100 headline score
plus named details, e.g. choice's accuracy and macro-F1).

    from jobs.metrics import score_split
    yes_no = MetricConfig(name="choice", labels=["yes", "no"])
    result = score_split(yes_no, ["Yes.", "no", "maybe"], ["yes", "no", "no"])
    result.score     # 66.67 (accuracy)
    result.details   # {"accuracy": 66.67, "macro_f1": 83.33, "unmapped": 33.33} (F1 yes 1, no 2/3)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jobs.metrics.choice import NONE_LABEL, LabelSet, choice_scores
from jobs.metrics.dispatch import scorer
from jobs.metrics.json_fields import first_json_object
from jobs.metrics.numeric import first_number
from jobs.metrics.pattern import extract_answer

if TYPE_CHECKING:
    from jobs.task_config import MetricConfig

# The details key that repeats the headline score, per metric.
HEADLINE_KEY: dict[str, str] = {
    "exact_match": "exact_match",
    "choice": "accuracy",
    "json_fields": "field_f1",
    "rouge_l": "rouge_l",
    "numeric": "accuracy",
    "regex": "exact_match",
}


@dataclass(frozen=True)
class MetricResult:
    """A split's score: `score` 0-100 (higher is better) and `details`, all 0-100, starting with the headline.

    details per metric: exact_match {exact_match}; choice {accuracy, macro_f1, unmapped: predictions that map to no
    label}; json_fields {field_f1, parsed: predictions holding a JSON object}; rouge_l {rouge_l}; numeric
    {accuracy, parsed: predictions holding a number}; regex {exact_match, matched: predictions the pattern matches}.
    """

    score: float
    details: dict[str, float] = field(default_factory=dict)


def _percent(flags: Sequence[bool]) -> float:
    return 100.0 * sum(flags) / len(flags)


def score_split(metric: MetricConfig, predictions: Sequence[str], references: Sequence[str]) -> MetricResult:
    """Score all predictions of a split against their references (same order, same length, at least one).

    Raises ValueError for eval_loss (the evaluator scores it from the loss), for mismatched or empty lists, and for
    a reference the metric cannot use (naming its 0-based row), e.g. a json_fields reference that is no JSON object.
    """
    if metric.name == "eval_loss":
        raise ValueError(
            "metric eval_loss is scored from the model's mean loss on the eval split by the evaluator, "
            "not from predictions; score_split has nothing to score"
        )
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; give one per reference")
    if not references:
        raise ValueError("no rows to score: the eval split is empty")
    if metric.name == "choice":
        labels = LabelSet(metric.labels if metric.labels is not None else references)
        mapped = [labels.map(prediction) for prediction in predictions]
        accuracy, macro_f1 = choice_scores(mapped, [labels.canonical(r) for r in references], labels)
        unmapped = _percent([label == NONE_LABEL for label in mapped])
        return MetricResult(accuracy, {"accuracy": accuracy, "macro_f1": macro_f1, "unmapped": unmapped})
    row = scorer(metric)
    total = 0.0
    for i, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        try:
            total += row(prediction, reference)
        except ValueError as err:
            raise ValueError(f"{metric.name}: reference row {i}: {err}") from None
    headline = 100.0 * total / len(references)
    details = {HEADLINE_KEY[metric.name]: headline}
    if metric.name == "json_fields":
        details["parsed"] = _percent([first_json_object(p) is not None for p in predictions])
    elif metric.name == "numeric":
        details["parsed"] = _percent([first_number(p) is not None for p in predictions])
    elif metric.name == "regex":
        assert metric.pattern is not None  # MetricConfig requires it for regex; scorer() has checked
        details["matched"] = _percent([extract_answer(p, metric.pattern) is not None for p in predictions])
    return MetricResult(headline, details)
