"""The json_fields metric: F1 over the (key, value) pairs of a JSON object, optionally only some keys.

from jobs.metrics.json_fields import json_field_f1
json_field_f1('{"a": 1}', '{"a": 1, "b": 2}')                 # 0.667 (P = 1, R = 1/2)
json_field_f1('{"a": 1}', '{"a": 1, "b": 2}', fields=["a"])   # 1.0
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jobs.metrics.text import normalise_text


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


def field_pairs(obj: dict[str, Any], fields: Sequence[str] | None = None) -> set[tuple[str, str]]:
    """The normalised (key, value) pairs of `obj`; only keys in `fields` (compared normalised) when given."""
    keep = None if fields is None else {normalise_text(field) for field in fields}
    pairs = {(normalise_text(str(key)), _normalise_value(value)) for key, value in obj.items()}
    return pairs if keep is None else {pair for pair in pairs if pair[0] in keep}


def json_field_f1(prediction: str, reference: str, fields: Sequence[str] | None = None) -> float:
    """F1 over (key, normalised value) pairs of two JSON objects (nested values are compared whole).

    With `fields`, only those keys count, in both objects. The prediction may carry junk around the object (the
    first parseable `{...}` is used); an unparseable prediction scores 0.0. The reference must parse (ValueError
    otherwise). No pairs on either side scores 1.0.
    """
    ref_obj = first_json_object(reference)
    if ref_obj is None:
        raise ValueError(f"reference is not a JSON object: {reference[:80]!r}")
    pred_obj = first_json_object(prediction)
    if pred_obj is None:
        return 0.0
    pred, ref = field_pairs(pred_obj, fields), field_pairs(ref_obj, fields)
    if not pred and not ref:
        return 1.0
    overlap = len(pred & ref)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)
