"""ROUGE-L F-measure, pure Python, checked against Google's `rouge-score` (tests/test_metrics_rouge.py).

    from jobs.metrics.rouge import rouge_l
    rouge_l("the cat sat on the mat", "the cat is on the mat")   # 0.8333 (LCS 5 of 6 tokens each way)

The LCS, precision (LCS / prediction tokens), recall (LCS / reference tokens) and F (beta = 1) are computed as
`rouge_score.rouge_scorer.RougeScorer(["rougeL"])` computes them (no stemming, its default); the tests check the two
agree to 1e-12 (the same float operations) on the bundled viggo eval split and its edits, and on non-ASCII text
when the library is given our tokenizer.

Where we differ from the library, on purpose:
- Tokenisation. rouge-score lowercases and keeps only runs of [a-z0-9]: every other character is a separator, so
  "café" becomes "caf" (and equals "cafè"), and Greek, Cyrillic, Hindi, Chinese or Japanese text has no tokens at
  all (identical texts score 0.0). For ASCII text `word_tokens` gives exactly its tokens. For other text it keeps
  every script: a token is a run of letters, digits and combining marks (so Devanagari vowel signs stay inside the
  word; Python's `\\w` would split there), after NFKC normalisation (composed and decomposed accents, full-width
  forms compare equal). Scripts written without spaces between words (Chinese, Japanese kana, Thai, Lao, Khmer,
  Myanmar) are split into one token per character (with its combining marks), the usual choice for ROUGE on
  those languages, instead of one token per sentence.
- Two texts that both have no tokens (e.g. two empty strings) score 1.0 here (they agree); rouge-score gives 0.0.
"""

from __future__ import annotations

import re
import unicodedata

_ASCII_WORD = re.compile(r"[a-z0-9]+")
# Scripts written without spaces between words: each character (plus its combining marks) is one token.
_UNSPACED_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3134F),  # CJK extensions B-G
)


def _unspaced(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _UNSPACED_RANGES)


def word_tokens(text: str) -> list[str]:
    """Lowercase word tokens: for ASCII text the runs of [a-z0-9] (exactly rouge-score's tokens); otherwise runs
    of letters, digits and combining marks after NFKC, with one token per character in unspaced scripts."""
    if text.isascii():
        return _ASCII_WORD.findall(text.lower())
    tokens: list[str] = []
    current: list[str] = []
    extendable = False  # may the next letter or digit extend `current`?
    for char in unicodedata.normalize("NFKC", text).lower():
        kind = unicodedata.category(char)[0]
        if kind == "M" and current:  # a combining mark belongs to the token it follows
            current.append(char)
            continue
        if kind in "LN":
            if _unspaced(char) or not extendable:
                if current:
                    tokens.append("".join(current))
                current = [char]
                extendable = not _unspaced(char)
            else:
                current.append(char)
            continue
        if current:  # anything else (space, punctuation, symbol, a stray mark) separates words
            tokens.append("".join(current))
        current, extendable = [], False
    if current:
        tokens.append("".join(current))
    return tokens


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
    """ROUGE-L F-measure (beta = 1) over `word_tokens`; two texts without tokens score 1.0."""
    pred, ref = word_tokens(prediction), word_tokens(reference)
    if not pred and not ref:
        return 1.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
