"""Our ROUGE-L (jobs/metrics/rouge.py) against the reference implementation, Google's `rouge-score` (dev extra).

- ASCII text (the bundled viggo eval split: each reference against the next row's reference and against seven
  edits of itself): our score equals `RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure` to
  1e-12 (both do the same float operations; in practice the values are bit-identical), and our tokens equal its
  tokens on any ASCII text.
- Non-ASCII text: the library's default tokenizer keeps only [a-z0-9], so we tokenise differently on purpose (see
  the module docstring); given our tokenizer, the library's LCS and F-measure agree with ours to 1e-12, and the
  tests below pin down where the default tokenizer goes wrong.

Run: `pytest tests/test_metrics_rouge.py -q` (pure Python; a few seconds, mostly importing nltk for rouge-score).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer, tokenize

from jobs.metrics import rouge_l, word_tokens

VIGGO_EVAL = Path(__file__).resolve().parents[1] / "jobs" / "tasks" / "data" / "viggo" / "eval.jsonl"
TOLERANCE = 1e-12


class OurTokenizer:
    """rouge-score's tokenizer interface (`tokenize(text)`) around our `word_tokens`."""

    def tokenize(self, text: str) -> list[str]:
        return word_tokens(text)


def library_rouge_l(prediction: str, reference: str, scorer: rouge_scorer.RougeScorer) -> float:
    return scorer.score(reference, prediction)["rougeL"].fmeasure  # score(target, prediction)


def edits(text: str) -> list[str]:
    """Seven small edits of a sentence: drop, swap, replace and add words, change case and punctuation, reverse,
    truncate."""
    words = text.split()
    swapped = [words[1], words[0], *words[2:]] if len(words) > 1 else words
    return [
        " ".join(words[:1] + words[2:]),
        " ".join(swapped),
        " ".join(words[:-1] + ["banana"]),
        text.upper().replace(".", "").replace(",", " ,"),
        text + " And it is fun, fun, fun!",
        " ".join(reversed(words)),
        " ".join(words[: len(words) // 2]),
    ]


def pairs(texts: list[str]) -> list[tuple[str, str]]:
    """(prediction, reference): each text against the next one and against its edits."""
    out = []
    for i, reference in enumerate(texts):
        out.append((texts[(i + 1) % len(texts)], reference))
        out += [(edited, reference) for edited in edits(reference)]
    return out


def test_agrees_with_rouge_score_on_viggo_eval() -> None:
    references = [json.loads(line)["output"] for line in VIGGO_EVAL.read_text().splitlines() if line.strip()]
    assert len(references) == 100
    scorer = rouge_scorer.RougeScorer(["rougeL"])  # defaults: no stemming, its own tokenizer
    checked = pairs(references)
    ours = [rouge_l(p, r) for p, r in checked]
    theirs = [library_rouge_l(p, r, scorer) for p, r in checked]
    worst = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    assert worst <= TOLERANCE, f"largest difference {worst}"
    assert len(checked) == 800
    assert sum(0.0 < s < 1.0 for s in ours) > 600  # mostly partial overlaps: the comparison is not trivial
    assert sum(s == 1.0 for s in ours) >= 100  # the case/punctuation edit scores 1.0 in both


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=60))
def test_ascii_tokens_equal_rouge_score_tokens(text: str) -> None:
    assert word_tokens(text) == tokenize.tokenize(text, None)


NON_ASCII = [
    "Le café crème est très bon à Montréal.",
    "Die Straße in München ist schön und groß.",
    "El niño comió piña en la mañana.",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον σκύλο.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "हिन्दी एक सुंदर भाषा है और बहुत लोग बोलते हैं।",
    "القط يجلس على السجادة في البيت.",
    "我喜欢在周末和朋友一起看电影。",
    "東京タワーへ行きたいです。",
    "나는 오늘 아침에 커피를 마셨다.",
    "ฉันชอบกินข้าวผัดมาก",
    "Café ☕ and naïve résumé 🎉 tests",
]


def test_agrees_with_rouge_score_given_our_tokenizer_on_non_ascii_text() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=OurTokenizer())
    checked = pairs(NON_ASCII)
    checked += [(text[: len(text) // 2], text) for text in NON_ASCII]  # unspaced scripts: half the characters
    ours = [rouge_l(p, r) for p, r in checked]
    theirs = [library_rouge_l(p, r, scorer) for p, r in checked]
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= TOLERANCE
    assert sum(0.0 < s < 1.0 for s in ours) > len(checked) // 2


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),  # vowel signs (combining marks) stay in the word
        ("我爱猫。", ["我", "爱", "猫"]),  # unspaced script: one token per character
        ("cat猫dog", ["cat", "猫", "dog"]),
        ("สวัสดี", ["ส", "วั", "ส", "ดี"]),  # Thai: each letter with its marks
        ("ΚΑΛΗΜΕΡΑ κόσμε", ["καλημερα", "κόσμε"]),
        ("ｆｕｌｌ－ｗｉｄｔｈ", ["full", "width"]),  # NFKC
        ("nai\u0308ve", ["naïve"]),  # decomposed and composed accents compare equal
        ("Bonjour, l'été!", ["bonjour", "l", "été"]),
    ],
)
def test_word_tokens_non_ascii(text: str, tokens: list[str]) -> None:
    assert word_tokens(text) == tokens


def test_where_the_default_tokenizer_is_wrong_for_non_english_text() -> None:
    default = rouge_scorer.RougeScorer(["rougeL"])
    chinese = "我喜欢在周末和朋友一起看电影。"
    assert library_rouge_l(chinese, chinese, default) == 0.0  # no [a-z0-9] tokens at all
    assert rouge_l(chinese, chinese) == 1.0
    # "café crème" -> caf, cr, me and "cafè creme" -> caf, creme: LCS 1 (caf), P 1/2, R 1/3 -> F 0.4
    assert library_rouge_l("cafè creme", "café crème", default) == pytest.approx(0.4)
    assert rouge_l("cafè creme", "café crème") == 0.0  # different words
    assert rouge_l("cafe\u0301 crème", "café crème") == 1.0  # the same words, differently encoded
