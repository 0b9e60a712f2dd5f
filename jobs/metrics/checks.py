"""Checks of a split's references against its metric, run before any training (`lorafleet data check`, preflight).

    from jobs.metrics import check_references, label_balance
    check_references(MetricConfig(name="choice"), ["yes", "yes"])   # ["choice: the references hold one class ..."]
    label_balance(MetricConfig(name="choice"), ["yes", "no", "yes"])   # {"yes": 2, "no": 1}

Each problem is one human-readable line; lines starting with "warning: " are worth a look but need not stop a run
(the others would make the metric meaningless or fail during evaluation). Row numbers are 0-based positions in the
list given.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jobs.metrics.choice import LabelSet, label_counts
from jobs.metrics.json_fields import first_json_object
from jobs.metrics.numeric import first_number
from jobs.metrics.text import normalise_text

if TYPE_CHECKING:
    from jobs.task_config import MetricConfig

WARNING = "warning: "
MAX_EXAMPLES = 5


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _rows(indices: list[int], references: Sequence[str]) -> str:
    """ "3 rows (first: row 7: '...')"."""
    first = indices[0]
    noun = "row" if len(indices) == 1 else "rows"
    return f"{len(indices)} {noun} (first: row {first}: {_short(references[first])})"


def label_balance(metric: MetricConfig, references: Sequence[str]) -> dict[str, int]:
    """Rows per label for a choice metric: `metric.labels` first in their order (0 for absent ones), then labels
    found in the references outside that set; without `labels`, the references' labels by count. ValueError for
    any other metric."""
    if metric.name != "choice":
        raise ValueError(f"label balance is for metric choice, not {metric.name}")
    return label_counts(metric.labels, references)


def _check_choice(metric: MetricConfig, references: Sequence[str]) -> list[str]:
    problems = []
    counts = label_counts(metric.labels, references)
    seen = {label: count for label, count in counts.items() if count}
    if len(seen) < 2:
        ((label, count),) = seen.items()
        rows = "1 row" if count == 1 else f"{count} rows"
        problems.append(
            f"choice: the references hold one class ({label!r}, {rows}); a label set with one class cannot measure "
            "a classifier: add rows of the other labels"
        )
    if metric.labels is not None:
        label_set = LabelSet(metric.labels)
        outside = {label: n for label, n in counts.items() if label not in label_set.labels}  # by count already
        if outside:
            examples = ", ".join(f"{_short(label, 30)} ({n})" for label, n in list(outside.items())[:MAX_EXAMPLES])
            more = f" and {len(outside) - MAX_EXAMPLES} more" if len(outside) > MAX_EXAMPLES else ""
            problems.append(
                f"choice: {sum(outside.values())} references are not in labels [{', '.join(label_set.labels)}]: "
                f"{examples}{more}"
            )
        unseen = [label for label in label_set.labels if not counts.get(label)]
        if unseen and len(seen) >= 2:
            problems.append(f"{WARNING}choice: labels never seen in the references: {', '.join(unseen)}")
    return problems


def _check_json_fields(metric: MetricConfig, references: Sequence[str]) -> list[str]:
    objects = [first_json_object(reference) for reference in references]
    bad = [i for i, obj in enumerate(objects) if obj is None]
    problems = [f"json_fields: references that are not JSON objects: {_rows(bad, references)}"] if bad else []
    for name in metric.fields or []:
        key = normalise_text(name)
        missing = [i for i, obj in enumerate(objects) if obj is not None and key not in map(normalise_text, obj)]
        if missing:
            problems.append(f"{WARNING}json_fields: field {name!r} is missing in {_rows(missing, references)}")
    return problems


def _check_regex(metric: MetricConfig, references: Sequence[str]) -> list[str]:
    assert metric.pattern is not None  # MetricConfig requires it for regex
    compiled = re.compile(metric.pattern)
    if any(compiled.search(reference) for reference in references):
        return []
    return [
        f"{WARNING}regex: pattern {metric.pattern!r} matches no reference; references are compared as written "
        "with the answer the pattern extracts from each prediction"
    ]


def check_references(metric: MetricConfig, references: Sequence[str]) -> list[str]:
    """Problems that would make `metric` fail or mean little on these references (empty list: none found)."""
    if metric.name == "eval_loss":
        return []  # scored from the loss: references need no particular form
    if not references:
        return [f"{metric.name}: no references to score against (the eval split is empty)"]
    problems: list[str] = []
    empty = [i for i, reference in enumerate(references) if not reference.strip()]
    if empty:
        problems.append(f"{WARNING}{metric.name}: empty references: {_rows(empty, references)}")
    if metric.name == "choice":
        problems += _check_choice(metric, references)
    elif metric.name == "json_fields":
        problems += _check_json_fields(metric, references)
    elif metric.name == "numeric":
        bad = [i for i, reference in enumerate(references) if first_number(reference) is None]
        if bad:
            problems.append(f"numeric: references without a number: {_rows(bad, references)}")
    elif metric.name == "regex":
        problems += _check_regex(metric, references)
    return problems
