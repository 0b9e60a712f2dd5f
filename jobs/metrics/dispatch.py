"""Per-row scoring driven by a metric: `scorer(metric)` builds a (prediction, reference) -> [0, 1] function from a
`jobs.task_config.MetricConfig`; `score(name_or_config, prediction, reference)` scores one row.

    from jobs.metrics import score
    score("rouge_l", "the cat sat", "the cat is")                                        # 0.667
    score(MetricConfig(name="numeric", tolerance=0.01), "about 101", "100")               # 1.0
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import TYPE_CHECKING

from jobs.metrics.choice import LabelSet, choice_match
from jobs.metrics.json_fields import json_field_f1
from jobs.metrics.numeric import numeric_match
from jobs.metrics.pattern import regex_match
from jobs.metrics.rouge import rouge_l
from jobs.metrics.text import exact_match

if TYPE_CHECKING:  # jobs.task_config is imported lazily: it may one day import this package
    from jobs.task_config import MetricConfig

RowScorer = Callable[[str, str], float]
# Metric names `score` accepts; "json_f1" is the bundled tasks' older name of json_fields.
ALIASES: dict[str, str] = {"json_f1": "json_fields"}
METRIC_NAMES: tuple[str, ...] = ("exact_match", "choice", "json_fields", "json_f1", "rouge_l", "numeric", "regex")


def is_lower_better(metric: MetricConfig) -> bool:
    """True for eval_loss (a loss), False for every metric scored from predictions (0-100, higher is better)."""
    return metric.name == "eval_loss"


def scorer(metric: MetricConfig, references: Sequence[str] | None = None) -> RowScorer:
    """The per-row scorer of a metric, returning 0..1. For `choice` without `labels`, `references` (the split's)
    give the label set; without either only the normalised exact match counts. eval_loss has none (ValueError)."""
    name = metric.name
    if name == "exact_match":
        return exact_match
    if name == "rouge_l":
        return rouge_l
    if name == "json_fields":
        return partial(json_field_f1, fields=metric.fields) if metric.fields is not None else json_field_f1
    if name == "numeric":
        return partial(numeric_match, tolerance=metric.tolerance)
    if name == "regex":
        if not metric.pattern:
            raise ValueError("pattern: metric regex needs a pattern")
        return partial(regex_match, pattern=re.compile(metric.pattern))
    if name == "choice":
        labels = metric.labels if metric.labels is not None else references
        if labels is None:
            return choice_match
        return LabelSet(labels).match
    if name == "eval_loss":
        raise ValueError(
            "metric eval_loss is scored from the model's loss on the eval split by the evaluator, not from "
            "predictions; there is no per-row or per-prediction score"
        )
    raise ValueError(f"unknown metric '{name}'; known: {', '.join(METRIC_NAMES)}, eval_loss")


@lru_cache(maxsize=32)
def _named_scorer(name: str) -> RowScorer:
    from jobs.task_config import MetricConfig

    canonical = ALIASES.get(name, name)
    if canonical not in METRIC_NAMES and canonical != "eval_loss":  # eval_loss: scorer() explains why it has none
        raise ValueError(f"unknown metric '{name}'; known: {', '.join(METRIC_NAMES)}")
    if canonical == "regex":
        raise ValueError("metric regex needs a pattern: pass MetricConfig(name='regex', pattern=...) instead")
    return scorer(MetricConfig(name=canonical))


def score(metric: str | MetricConfig, prediction: str, reference: str) -> float:
    """Score one prediction against its reference, in [0, 1]. `metric` is a MetricConfig or a metric name
    (`exact_match`, `choice`, `json_fields` / `json_f1`, `rouge_l`, `numeric`; with their default options)."""
    row = _named_scorer(metric) if isinstance(metric, str) else scorer(metric)
    return row(prediction, reference)
