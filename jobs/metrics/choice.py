"""The choice metric (classification): map a free-text prediction to one label of a set, then accuracy and
macro-F1 over the set; also the label balance of a split.

    from jobs.metrics.choice import LabelSet, choice_scores
    labels = LabelSet(["positive", "negative", "neutral"])
    labels.map("I'd say Positive.")          # "positive" (the only label that occurs as a whole word)
    labels.map("positive or negative")       # "(none)" (two labels occur)
    choice_scores(["positive", "(none)"], ["positive", "negative"], labels)   # (50.0, 50.0)

A prediction maps to the label equal to it after `normalise_text` (case, outer whitespace, one trailing period), else
to the one label that occurs in it as a whole word (normalised; between non-word characters) if exactly one does,
else to NONE_LABEL. A reference is its label when it normalises to one; otherwise it stays outside the set (always
wrong; `check_references` reports such rows before training).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from jobs.metrics.text import normalise_text

NONE_LABEL = "(none)"


class LabelSet:
    """A label set: labels compared after `normalise_text`; the first spelling of each is the one reported."""

    def __init__(self, labels: Iterable[str]) -> None:
        self.by_norm: dict[str, str] = {}
        for label in labels:
            self.by_norm.setdefault(normalise_text(label), label.strip())
        self.labels: list[str] = list(self.by_norm.values())
        self._words = [
            (re.compile(rf"(?<!\w){re.escape(norm)}(?!\w)"), label) for norm, label in self.by_norm.items() if norm
        ]

    def canonical(self, reference: str) -> str | None:
        """The label a reference names, or None when it names none of them."""
        return self.by_norm.get(normalise_text(reference))

    def map(self, prediction: str) -> str:
        """The label a prediction names (see the module docstring), or NONE_LABEL."""
        norm = normalise_text(prediction)
        if norm in self.by_norm:
            return self.by_norm[norm]
        hits = [label for word, label in self._words if word.search(norm)]
        return hits[0] if len(hits) == 1 else NONE_LABEL

    def match(self, prediction: str, reference: str) -> float:
        """1.0 when the prediction maps to the label the reference names, else 0.0 (also for a reference outside
        the set)."""
        gold = self.canonical(reference)
        return 1.0 if gold is not None and self.map(prediction) == gold else 0.0


def choice_match(prediction: str, reference: str, labels: Sequence[str] | None = None) -> float:
    """1.0 when the prediction maps to the reference's label. Without `labels` there is no set to find a label
    word in, so only the normalised exact match counts (`score_split` uses the split's references as the set)."""
    if labels is None:
        return 1.0 if normalise_text(prediction) == normalise_text(reference) else 0.0
    return LabelSet(labels).match(prediction, reference)


def choice_scores(predicted: Sequence[str], gold: Sequence[str | None], labels: LabelSet) -> tuple[float, float]:
    """(accuracy, macro-F1), both 0-100, of mapped predictions against canonical references (None: outside the set).

    Macro-F1 averages the per-label F1 = 2TP / (2TP + FP + FN) over the labels of the set that occur in the
    references or the predictions; a label with neither has no F1 (0/0) and is left out, as scikit-learn's
    `f1_score(average="macro")` leaves out labels it never sees. NONE_LABEL and references outside the set are no
    class of their own: they only count as misses of the other side.
    """
    if len(predicted) != len(gold) or not gold:
        raise ValueError(f"need as many predictions as references, at least one ({len(predicted)} vs {len(gold)})")
    correct = sum(1 for p, g in zip(predicted, gold, strict=True) if g is not None and p == g)
    f1s = []
    for label in labels.labels:
        tp = sum(1 for p, g in zip(predicted, gold, strict=True) if p == label and g == label)
        fp = sum(1 for p, g in zip(predicted, gold, strict=True) if p == label and g != label)
        fn = sum(1 for p, g in zip(predicted, gold, strict=True) if g == label and p != label)
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    macro = sum(f1s) / len(f1s) if f1s else 0.0
    return 100.0 * correct / len(gold), 100.0 * macro


def label_counts(labels: Sequence[str] | None, references: Iterable[str]) -> dict[str, int]:
    """Rows per label: the labels of `labels` first, in their order (0 for unseen ones), then references outside
    the set (as written, stripped) by count; without `labels`, the references' labels by count (ties by name)."""
    label_set = LabelSet(labels or [])
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    for reference in references:
        label = label_set.canonical(reference)
        if label is None:
            label = spelling.setdefault(normalise_text(reference), reference.strip())
        counts[label] += 1
    ordered = {label: counts.get(label, 0) for label in label_set.labels}
    for label, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        ordered.setdefault(label, count)
    return ordered
