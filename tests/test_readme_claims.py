"""Every measured figure in README.md is a quote: of bench/RESULTS.md, or of a named test or results file.

What counts as a figure (outside fenced code blocks and `inline code`): a number (digits, optional thousands
commas, decimals, or a range such as 45-50 / 3–9) directly followed by a ratio sign (`6.4x`, `0.5–0.6×`, no space),
or by `%`, or, after at most one space, by a unit of time, rate or size: ms, s, sec, seconds, min, minutes, h,
hours, tokens/s, tok/s, MB, GB, MiB, GiB, TB/s, GB/s. Dates, counts, versions and identifiers (`r16`, `v5.5.0`,
`8×A100`) are not figures, nor are settings: a value right after the word "default" ("(default 120 s)").

Where a figure may come from (checked in this order):
1. bench/RESULTS.md holds the same figure: the same number(s) with the same unit, found there by the same pattern
   (bold markers, thousands commas and the space before a unit ignored; `0.73x` is not `0.70-0.73x`);
2. its statement names a test: a `tests/test_*.py` file or a `test_*` function that exists under tests/ (the
   Reliability table's "checked by" column, or "(`tests/test_cotrain.py`)" in prose). A statement is the sentence
   holding the figure, or for a table row, the row; this file itself does not count;
3. its statement names another results file in the repository (`*.md`, e.g. `jobs/tasks/BASE_SCORES.md`) that
   holds the same figure.
So a new README figure is quoted by recording it (with its command and date) in bench/RESULTS.md, or by citing
the test or results file it comes from in the same statement.

KNOWN_UNSOURCED lists figures of sections being rewritten elsewhere (issue 16), each with why; the test fails on
any other unsourced figure, and on an entry that no longer matches an unsourced figure (delete it then).

    pytest tests/test_readme_claims.py -q
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "bench" / "RESULTS.md"

_NUMBER = r"\d[\d,]*(?:\.\d+)?"
_UNITS = r"tokens/s|tok/s|TB/s|GB/s|ms|seconds|sec|s|minutes|min|hours|h|MiB|GiB|MB|GB"
FIGURE = re.compile(
    rf"(?<![\w.\-–/])(?P<num>{_NUMBER}(?:\s?[-–]\s?{_NUMBER})?)"
    rf"(?:(?P<ratio>[x×])(?![\w])|(?P<pct>%)|\s?(?P<unit>{_UNITS})(?![\w/]))"
)
TEST_NAME = re.compile(r"\b(tests/test_\w+\.py|test_\w+)\b")
RESULTS_FILE = re.compile(r"\b([\w./-]+\.md)\b")
SETTING = re.compile(r"\bdefaults?(?: to| is)?:?\s*$", re.IGNORECASE)  # "(default 120 s)": a setting, not a claim

# section heading -> (why its figures are not quoted yet, those figures). Only for sections being rewritten for
# other issues; each entry must still match an unsourced figure (else the test asks to delete it).
_LEAD_REWRITING = "issue 16 rewrites this section (make demo timings: record them in bench/RESULTS.md)"
KNOWN_UNSOURCED: dict[str, tuple[str, tuple[str, ...]]] = {
    "lorafleet": (_LEAD_REWRITING, ("30 minutes", "3–9 min", "26 min", "1 min", "25 minutes", "10 minutes")),
    "Results (CPU, SmolLM2-135M, `jobs/configs/cpu-smollm2.yaml`)": (
        _LEAD_REWRITING,
        ("238 s", "377 s", "253 s", "349 s", "287 s", "291 s", "25 min", "55 s", "27 min", "13 s", "31 min", "35 s"),
    ),
    "Run on a Ray cluster": (
        "GPU packing (being written): sizes derived from ../shared/README.md's H100 figures",
        ("80 GB", "12.8 GB", "7.43 GB", "18.4 GB", "40 GB"),
    ),
    "What a sweep costs (estimate)": (
        "an estimate from ../shared/README.md's H100 baselines (outside this repository)",
        ("3,200 tokens/s", "0.5–0.6×"),
    ),
}


@dataclass(frozen=True)
class Figure:
    section: str
    text: str  # as written, e.g. "6.4x", "25 min", "45-50%"
    statement: str  # the paragraph, list item or table row holding it

    @property
    def key(self) -> str:
        """Number + unit without spaces, bold markers or thousands commas: what a source must hold."""
        return _normal(self.text)


def _normal(text: str) -> str:
    return re.sub(r"[\s*,]", "", text).replace("–", "-").replace("×", "x")


def _prose(markdown: str) -> list[tuple[str, str]]:
    """(section heading, statement) for every sentence of a paragraph or list item and every table row outside
    fenced code, with inline code emptied (its numbers are settings and commands, not claims)."""
    out: list[tuple[str, str]] = []
    section, block, fenced = "", [], False

    def flush() -> None:
        if block:
            text = re.sub(r"`[^`]*`", lambda m: "`" + _sources_only(m.group(0)) + "`", " ".join(block))
            parts = [text] if text.startswith("|") else SENTENCE_END.split(text)
            out.extend((section, part) for part in parts)
            block.clear()

    for line in markdown.splitlines():
        if line.startswith("```"):
            flush()
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.startswith("#"):
            flush()
            section = line.lstrip("#").strip()
            continue
        if not line.strip() or line.lstrip().startswith(("|", "- ", "* ")):
            flush()
        if line.strip():
            block.append(line.strip())
        if line.lstrip().startswith("|"):
            flush()  # each table row is its own statement
    flush()
    return out


SENTENCE_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[a-z0-9)%`*][.!?])\s+(?=[A-Z(`*])")


def _sources_only(code: str) -> str:
    """Inline code keeps only what names a source (a test or a results file); numbers in it are not figures."""
    return " ".join(m.group(0) for m in re.finditer(rf"{TEST_NAME.pattern}|{RESULTS_FILE.pattern}", code))


def _tests_text() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "tests").glob("test_*.py")))


def figures(markdown: str) -> list[Figure]:
    return [Figure(section, m.group(0), statement) for section, statement in _prose(markdown)
            for m in FIGURE.finditer(statement) if not SETTING.search(statement[: m.start()])]  # fmt: skip


def figure_keys(markdown: str) -> set[str]:
    """The figures of a results file, normalised (the whole text: recorded output may sit in code blocks)."""
    return {_normal(m.group(0)) for m in FIGURE.finditer(markdown.replace("*", ""))}


def _sourced(figure: Figure, results: set[str]) -> bool:
    if figure.key in results:
        return True
    tests_text = _tests_text()
    for name in TEST_NAME.findall(figure.statement):
        if Path(name).stem == Path(__file__).stem:
            continue
        if (REPO / name).is_file() if name.endswith(".py") else f"def {name}(" in tests_text:
            return True
    for name in RESULTS_FILE.findall(figure.statement):
        path = (REPO / name).resolve()
        if path.is_file() and path.is_relative_to(REPO) and figure.key in figure_keys(path.read_text()):
            return True
    return False


def test_the_figure_pattern() -> None:
    text = (
        "Decode 6.4x faster, 0.5–0.6× an H100, 45-50% faster, 25 min 55 s, 3,200 tokens/s, 13 tok/s, 2 ms, "
        "100 MB, 1.2 GB. Not figures: r16, v5.5.0, 8×A100, 2026-11-23, 60 steps, 64 requests, 4 × 4, `0.8x`."
    )
    assert [f.text for f in figures(text)] == ["6.4x", "0.5–0.6×", "45-50%", "25 min", "55 s", "3,200 tokens/s",
                                                "13 tok/s", "2 ms", "100 MB", "1.2 GB"]  # fmt: skip
    assert figures("```\nruns 9.9x faster\n```\n") == []
    assert figures("Requests time out (default 120 s). It took 120 s.") == [Figure("", "120 s", "It took 120 s.")]
    results = figure_keys("| **engine, 32 mixed** | 13,805 | **6.4x** |\nmixed-32 0.70-0.73x base, 3,200 tokens/s")
    assert results == {"6.4x", "0.70-0.73x", "3200tokens/s"}
    assert _sourced(Figure("s", "6.4x", "6.4x over PEFT"), results)
    assert _sourced(Figure("s", "3200 tokens/s", "3200 tokens/s"), results)
    assert not _sourced(Figure("s", "6.8x", "6.8x over PEFT"), results)
    assert not _sourced(Figure("s", "0.73x", "0.73x base"), results)  # a range's end is not a quote
    first, second = _prose("It runs 7.7x faster (`tests/test_cotrain.py`). It also uses 9% less.")
    assert _sourced(figures(first[1])[0], results) and not _sourced(figures(second[1])[0], results)
    assert not _sourced(Figure("s", "7.7x", "7.7x (`tests/test_no_such_file.py`)"), results)
    assert not _sourced(Figure("s", "7.7x", "7.7x (`tests/test_readme_claims.py`)"), results)


def test_every_readme_figure_is_quoted_from_results_or_a_named_test() -> None:
    readme = README.read_text()
    results = figure_keys(RESULTS.read_text())
    found = figures(readme)
    assert len(found) >= 10, "the figure pattern no longer finds README's figures"
    unsourced = {(f.section, f.text): f for f in found if not _sourced(f, results)}
    known = {(section, text) for section, (_, texts) in KNOWN_UNSOURCED.items() for text in texts}
    new = [f"[{s}] {t}: ...{f.statement[:160]}..." for (s, t), f in unsourced.items() if (s, t) not in known]
    assert not new, "README figures found neither in bench/RESULTS.md nor next to a named test:\n" + "\n".join(new)
    stale = sorted(known - set(unsourced))
    assert not stale, f"KNOWN_UNSOURCED entries that are quoted now or gone (delete them): {stale}"
