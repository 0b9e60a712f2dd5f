"""Task `text_to_sql` (text-to-SQL templating, exact match): an English question -> one SQL query over one fixed table.

Table: employees(name, department, city, salary, hire_year). Questions compose a selection (names, names and
salaries, count, average/highest/lowest salary, top-k by salary) with one or two filters; the query has one
canonical spelling (upper-case keywords, single-quoted strings, no semicolon).
Registered in `jobs.tasks`; regenerate data with `python -m jobs.tasks.generate`.
"""

from __future__ import annotations

import random

from jobs.tasks.common import unique_rows

NAME = "text_to_sql"
KIND = "text_to_sql"
METRIC = "exact_match"
INSTRUCTION = (
    "Translate the question into one SQL query over the table employees(name, department, city, salary, hire_year). "
    "Use upper-case SQL keywords, single quotes around text values, and no semicolon. "
    "Output only the query on one line."
)

DEPARTMENTS = ("Sales", "Engineering", "Marketing", "Finance", "Support", "Legal", "Design", "Research")
CITIES = ("Boston", "Denver", "Austin", "Seattle", "Chicago", "Miami", "Portland", "Atlanta")

# (question prefix ending before the filter, SELECT list) for row-returning and aggregate questions.
SELECTS = (
    (("List the names of employees", "Show the names of employees", "Which employees are"), "name"),
    (("List the names and salaries of employees", "Show the name and salary of employees"), "name, salary"),
    (("List the names and cities of employees", "Show the name and city of employees"), "name, city"),
    (("How many employees are", "Count the employees"), "COUNT(*)"),
    (("What is the average salary of employees",), "AVG(salary)"),
    (("What is the highest salary of employees",), "MAX(salary)"),
    (("What is the lowest salary of employees",), "MIN(salary)"),
)


def _filter(rng: random.Random) -> tuple[str, str]:
    """(English filter phrase, SQL condition)."""
    kind = rng.randrange(6)
    dept, city = rng.choice(DEPARTMENTS), rng.choice(CITIES)
    year, salary = rng.randint(2005, 2023), rng.randrange(40_000, 155_000, 5_000)
    if kind == 0:
        return f"in the {dept} department", f"department = '{dept}'"
    if kind == 1:
        return f"based in {city}", f"city = '{city}'"
    if kind == 2:
        word, op = rng.choice((("after", ">"), ("before", "<"), ("in", "=")))
        return f"hired {word} {year}", f"hire_year {op} {year}"
    if kind == 3:
        word, op = rng.choice((("more", ">"), ("less", "<")))
        return f"earning {word} than {salary}", f"salary {op} {salary}"
    if kind == 4:
        return f"in {dept} based in {city}", f"department = '{dept}' AND city = '{city}'"
    word, op = rng.choice((("after", ">"), ("before", "<")))
    return f"in {dept} hired {word} {year}", f"department = '{dept}' AND hire_year {op} {year}"


def make_one(rng: random.Random) -> tuple[str, str]:
    phrase, condition = _filter(rng)
    if rng.random() < 0.15:  # top-k by salary
        k = rng.randint(2, 10)
        word, order = rng.choice((("highest", "DESC"), ("lowest", "ASC")))
        question = f"List the {k} {word}-paid employees {phrase}."
        return question, f"SELECT name FROM employees WHERE {condition} ORDER BY salary {order} LIMIT {k}"
    prefixes, columns = rng.choice(SELECTS)
    prefix = rng.choice(prefixes)
    mark = "?" if prefix.startswith(("Which", "How", "What")) else "."
    return f"{prefix} {phrase}{mark}", f"SELECT {columns} FROM employees WHERE {condition}"


def make_rows(rng: random.Random, n: int) -> list[dict]:
    return unique_rows(rng, n, make_one, NAME)
