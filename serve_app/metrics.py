"""Serving metrics with `adapter` and `version` labels, exported by Ray's metrics agent in Prometheus format (each
node's metrics export port; names get Ray's `ray_` prefix, e.g. `ray_lorafleet_requests_total`).

Callers pass the canonical adapter id (`mlflow:sentiment/3`, `local:my-adapter:1a2b3c4d`) or `base`;
`adapter_labels` splits it so `adapter` is the name users request (`sentiment`) and `version` the registry version
or the local catalog's content stamp. `RayMetrics` is created inside a replica; `NullMetrics` is the no-Ray default
so the service runs anywhere. Query: `sum by (adapter, status) (rate(ray_lorafleet_requests_total[5m]))`.
"""

from __future__ import annotations

from typing import Protocol

_LATENCY_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


def adapter_labels(adapter: str) -> dict[str, str]:
    """Canonical adapter id -> `{"adapter": name, "version": version}` (version "" for the base model)."""
    kind, sep, rest = adapter.partition(":")
    if not sep:
        return {"adapter": adapter, "version": ""}
    if kind == "mlflow":  # mlflow:<name>/<version>
        name, _, version = rest.rpartition("/")
    else:  # local:<name>:<content stamp>
        name, _, version = rest.partition(":")
    return {"adapter": name, "version": version} if name else {"adapter": rest, "version": ""}


class Metrics(Protocol):
    def request(self, adapter: str, status: str) -> None: ...
    def tokens(self, adapter: str, prompt: int, completion: int) -> None: ...
    def ttft(self, adapter: str, seconds: float) -> None: ...
    def latency(self, adapter: str, seconds: float) -> None: ...
    def adapter_event(self, adapter: str, event: str) -> None: ...


class NullMetrics:
    def request(self, adapter: str, status: str) -> None: ...
    def tokens(self, adapter: str, prompt: int, completion: int) -> None: ...
    def ttft(self, adapter: str, seconds: float) -> None: ...
    def latency(self, adapter: str, seconds: float) -> None: ...
    def adapter_event(self, adapter: str, event: str) -> None: ...


class RayMetrics:
    def __init__(self) -> None:
        from ray.util import metrics

        keys = ("adapter", "version")
        self._requests = metrics.Counter("lorafleet_requests", "requests by adapter and outcome", (*keys, "status"))
        self._tokens_in = metrics.Counter("lorafleet_tokens_in", "prompt tokens", keys)
        self._tokens_out = metrics.Counter("lorafleet_tokens_out", "generated tokens", keys)
        self._ttft = metrics.Histogram("lorafleet_ttft_seconds", "time to first token", _LATENCY_BOUNDS, keys)
        self._latency = metrics.Histogram("lorafleet_latency_seconds", "request latency", _LATENCY_BOUNDS, keys)
        self._adapters = metrics.Counter("lorafleet_adapter_events", "adapter loads/evictions/rejections",
                                         (*keys, "event"))  # fmt: skip

    def request(self, adapter: str, status: str) -> None:
        self._requests.inc(1, {**adapter_labels(adapter), "status": status})

    def tokens(self, adapter: str, prompt: int, completion: int) -> None:
        labels = adapter_labels(adapter)
        self._tokens_in.inc(prompt, labels)
        if completion:
            self._tokens_out.inc(completion, labels)

    def ttft(self, adapter: str, seconds: float) -> None:
        self._ttft.observe(seconds, adapter_labels(adapter))

    def latency(self, adapter: str, seconds: float) -> None:
        self._latency.observe(seconds, adapter_labels(adapter))

    def adapter_event(self, adapter: str, event: str) -> None:
        self._adapters.inc(1, {**adapter_labels(adapter), "event": event})
