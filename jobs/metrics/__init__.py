"""Scoring for every task metric, pure Python: per row (0..1), per split (0-100 with details), and checks of a split's
references before training. Metrics are chosen by `jobs.task_config.MetricConfig` (name and options).

    from jobs.metrics import score, score_split, check_references
    score("rouge_l", "the cat sat on the mat", "the cat is on the mat")     # 0.8333, one row
    score_split(metric, predictions, references)                            # MetricResult(score=..., details={...})
    check_references(metric, references)                                    # ["numeric: references without ..."]

    python -m jobs.metrics rouge_l "the cat sat on the mat" "the cat is on the mat"
    python -m jobs.metrics numeric "about 1,001" "1000" --tolerance 0.01

One module per metric family: text (normalisation, exact_match), choice, json_fields, numeric, pattern (regex),
rouge (ROUGE-L; see its docstring for how it compares with the rouge-score library); dispatch (per-row scorer of a
MetricConfig), aggregate (score_split), checks (check_references, label_balance).
"""

from jobs.metrics.aggregate import MetricResult, score_split
from jobs.metrics.checks import check_references, label_balance
from jobs.metrics.choice import NONE_LABEL, LabelSet, choice_match, choice_scores
from jobs.metrics.dispatch import METRIC_NAMES, RowScorer, is_lower_better, score, scorer
from jobs.metrics.json_fields import first_json_object, json_field_f1
from jobs.metrics.numeric import first_number, numeric_match
from jobs.metrics.pattern import extract_answer, regex_match
from jobs.metrics.rouge import lcs_length, rouge_l, word_tokens
from jobs.metrics.text import exact_match, normalise_text

__all__ = [
    "METRIC_NAMES",
    "NONE_LABEL",
    "LabelSet",
    "MetricResult",
    "RowScorer",
    "check_references",
    "choice_match",
    "choice_scores",
    "exact_match",
    "extract_answer",
    "first_json_object",
    "first_number",
    "is_lower_better",
    "json_field_f1",
    "label_balance",
    "lcs_length",
    "normalise_text",
    "numeric_match",
    "regex_match",
    "rouge_l",
    "score",
    "score_split",
    "scorer",
    "word_tokens",
]
