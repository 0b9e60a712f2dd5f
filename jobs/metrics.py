"""Scoring functions for the bundled task suite: exact match, JSON field F1 and ROUGE-L, pure Python.

Every function takes (prediction, reference) strings and returns a float in [0, 1]; `score(metric, pred, ref)`
dispatches on a metric name. Used by `jobs.tasks.Task.score`; no model or dependency needed.

    python -m jobs.metrics rouge_l "the cat sat on the mat" "the cat is on the mat"
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from typing import Any

_WS = re.compile(r"\s+")
_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits (any script); punctuation and underscores separate words


def normalise_text(text: str) -> str:
    """Strip, collapse inner whitespace to one space, lowercase, and drop one trailing period."""
    text = _WS.sub(" ", text.strip()).lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both strings are equal after `normalise_text`, else 0.0."""
    return 1.0 if normalise_text(prediction) == normalise_text(reference) else 0.0


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first `{...}` in `text` that parses as a JSON object (junk around it is ignored), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def _normalise_value(value: Any) -> str:
    """A comparable form of a JSON value: strings via `normalise_text`; 2, 2.0 and "2" all become "2"."""
    if isinstance(value, str):
        return normalise_text(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)  # true / false / null
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False).lower()  # nested: compared whole


def _field_pairs(obj: dict[str, Any]) -> set[tuple[str, str]]:
    return {(normalise_text(str(key)), _normalise_value(value)) for key, value in obj.items()}


def json_field_f1(prediction: str, reference: str) -> float:
    """F1 over (key, normalised value) pairs of two flat JSON objects.

    The prediction may carry junk around the object (the first parseable `{...}` is used); an unparseable
    prediction scores 0.0. The reference must parse (ValueError otherwise). Two empty objects score 1.0.
    """
    ref_obj = first_json_object(reference)
    if ref_obj is None:
        raise ValueError(f"reference is not a JSON object: {reference[:80]!r}")
    pred_obj = first_json_object(prediction)
    if pred_obj is None:
        return 0.0
    pred, ref = _field_pairs(pred_obj), _field_pairs(ref_obj)
    if not pred and not ref:
        return 1.0
    overlap = len(pred & ref)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def word_tokens(text: str) -> list[str]:
    """Lowercase word tokens: maximal runs of letters and digits."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for token in a:
        cur = [0]
        for j, other in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if token == other else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) over lowercase word tokens; two empty texts score 1.0."""
    pred, ref = word_tokens(prediction), word_tokens(reference)
    if not pred and not ref:
        return 1.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "json_f1": json_field_f1,
    "rouge_l": rouge_l,
}


def score(metric: str, prediction: str, reference: str) -> float:
    """Score with the named metric (`exact_match`, `json_f1` or `rouge_l`)."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric '{metric}'; known: {', '.join(METRICS)}") from None
    return fn(prediction, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metric", choices=sorted(METRICS))
    parser.add_argument("prediction")
    parser.add_argument("reference")
    args = parser.parse_args()
    print(f"{score(args.metric, args.prediction, args.reference):.4f}")


if __name__ == "__main__":
    main()
