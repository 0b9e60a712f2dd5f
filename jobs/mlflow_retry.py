"""Riding out an MLflow server that is down: every client call retried with backoff while the server is
unreachable (connection refused or reset, timeouts, 5xx), for up to `$LORAFLEET_MLFLOW_RETRY_S` seconds (default
180) from the first failure, then `TrackingUnavailable` names the call that gave up. Used by jobs/tracking.py
(`SweepTracker`'s client) and jobs/ray_train.py (the metric queue); tested by tests/test_fault_mlflow_restart.py.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

RETRY_ENV = "LORAFLEET_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 180.0
_MAX_BACKOFF_S = 10.0


class TrackingUnavailable(RuntimeError):
    """MLflow stayed unreachable for longer than the retry budget."""


def retry_seconds() -> float:
    """How long a tracking call keeps retrying an unreachable MLflow ($LORAFLEET_MLFLOW_RETRY_S, default 180)."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        return DEFAULT_RETRY_S


def is_transient(err: BaseException) -> bool:
    """True for failures that a restarted or briefly overloaded server explains: no connection, a reset or timed
    out one, 5xx/429 answers (MLflow wraps those as "API request to ... failed with ..." once its own retries are
    spent). A 4xx answer (bad parameter, missing run, already exists) is a real error and is not retried."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, requests.HTTPError):
        status = err.response.status_code if err.response is not None else 0
        return status >= 500 or status in (408, 429)
    if isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(err, MlflowException):
        if err.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        return str(err.message).startswith("API request to ") and " failed with " in str(err.message)
    return False


def _unique_violation(err: BaseException) -> bool:
    """The server lost a race between two writers of the same row (sqlite, PostgreSQL and MySQL wordings)."""
    text = str(err)
    return any(m in text for m in ("IntegrityError", "UNIQUE constraint", "UniqueViolation", "Duplicate entry"))


def _short(err: BaseException, head: int = 150, tail: int = 150) -> str:
    """The error on one line; a long one keeps its start (the call) and its end (the cause: refused, reset ...)."""
    text = " ".join(str(err).split())
    return text if len(text) <= head + tail + 5 else f"{text[:head]} ... {text[-tail:]}"


def call_with_retry(what: str, fn: Callable[..., Any], *args: Any, retry_s: float | None = None, uri: str = "",
                    **kwargs: Any) -> Any:  # fmt: skip
    """`fn(*args, **kwargs)`, retried with backoff (1 s doubling to 10 s) while it fails transiently, for up to
    `retry_s` seconds from the first failure; then TrackingUnavailable naming `what`. Other errors propagate."""
    budget = retry_seconds() if retry_s is None else retry_s
    deadline, delay, failures, where = 0.0, 1.0, 0, f" {uri}" if uri else ""
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            if not is_transient(err):
                raise
            now = time.monotonic()
            if failures == 0:
                deadline = now + budget
                print(f"MLflow{where} unreachable during {what} ({_short(err)}); retrying for up to {budget:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
            failures += 1
            if now >= deadline:
                raise TrackingUnavailable(f"MLflow{where} did not answer for {budget:.0f} s ({failures} attempts) "
                                          f"during {what}; giving up: {_short(err)}") from err  # fmt: skip
            time.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, _MAX_BACKOFF_S)
            continue
        if failures:
            print(f"MLflow{where} answers again: {what} done after {failures} failed attempts", file=sys.stderr,
                  flush=True)  # fmt: skip
        return result


class RetryingClient:
    """An MlflowClient whose every method call goes through `call_with_retry` (`.raw` is the plain client)."""

    def __init__(self, client: Any, uri: str, retry_s: float | None = None) -> None:
        self.raw, self._uri, self._retry_s = client, uri, retry_s

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.raw, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            return call_with_retry(name, method, *args, retry_s=self._retry_s, uri=self._uri, **kwargs)

        return call
