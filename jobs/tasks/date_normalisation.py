"""Task `date_normalisation` (normalisation, exact match): a sentence with a date in some format -> `YYYY-MM-DD`.

Formats: "March 5, 2021", "5 March 2021", "Mar 5, 2021", "5th of March 2021", "Friday, March 5, 2021",
"03/05/2021" (numeric dates are month/day/year, as the instruction says), "5-Mar-2021" and "2021/03/05".
Registered in `jobs.tasks`; regenerate data with `python -m jobs.tasks.generate`.
"""

from __future__ import annotations

import datetime as dt
import random

from jobs.tasks.common import unique_rows

NAME = "date_normalisation"
KIND = "normalisation"
METRIC = "exact_match"
INSTRUCTION = (
    "Find the date in the text and rewrite it as YYYY-MM-DD. Numeric dates like 03/05/2021 are month/day/year. "
    "Output only the date."
)

MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
)  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")  # not strftime: locale
SENTENCES = (
    "The invoice is due on {d}.", "We moved into the new office on {d}.", "Her flight leaves on {d}.",
    "Deadline: {d}", "The contract was signed on {d}.", "He was born on {d}.", "The store reopens {d}.",
    "Please reply by {d}.", "Our wedding is on {d}!", "The report is dated {d}.", "Delivery expected {d}.",
    "The concert was held on {d}.", "Exam date: {d}", "Registration closes on {d}.",
)  # fmt: skip
_START, _DAYS = dt.date(1990, 1, 1), (dt.date(2035, 12, 31) - dt.date(1990, 1, 1)).days


def ordinal(day: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st, 22nd, 23rd, ..."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spell_date(date: dt.date, style: int) -> str:
    """One of eight written forms of `date` (style 0-7)."""
    month = MONTHS[date.month - 1]
    forms = (
        f"{month} {date.day}, {date.year}",
        f"{date.day} {month} {date.year}",
        f"{month[:3]} {date.day}, {date.year}",
        f"the {ordinal(date.day)} of {month} {date.year}",
        f"{WEEKDAYS[date.weekday()]}, {month} {date.day}, {date.year}",
        f"{date.month:02d}/{date.day:02d}/{date.year}",
        f"{date.day}-{month[:3]}-{date.year}",
        f"{date.year}/{date.month:02d}/{date.day:02d}",
    )
    return forms[style]


def make_one(rng: random.Random) -> tuple[str, str]:
    date = _START + dt.timedelta(days=rng.randrange(_DAYS + 1))
    text = rng.choice(SENTENCES).format(d=spell_date(date, rng.randrange(8)))
    return text[:1].upper() + text[1:], date.isoformat()


def make_rows(rng: random.Random, n: int) -> list[dict]:
    return unique_rows(rng, n, make_one, NAME)
