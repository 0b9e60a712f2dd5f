"""Chat message builders shared by the task-data tests (no fixtures, nothing runs at import)."""

from __future__ import annotations


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}
