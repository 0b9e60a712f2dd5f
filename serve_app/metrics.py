"""Serving metrics with an `adapter` label, exported by Ray's metrics agent in Prometheus format (each node's
metrics export port; names get Ray's `ray_` prefix, e.g. `ray_lorafleet_requests_total`).

`RayMetrics` is created inside a replica; `NullMetrics` is the no-Ray default so the service runs anywhere.
"""

from __future__ import annotations

from typing import Protocol

_LATENCY_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


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

        self._requests = metrics.Counter("lorafleet_requests", "requests by adapter and outcome", ("adapter", "status"))
        self._tokens_in = metrics.Counter("lorafleet_tokens_in", "prompt tokens", ("adapter",))
        self._tokens_out = metrics.Counter("lorafleet_tokens_out", "generated tokens", ("adapter",))
        self._ttft = metrics.Histogram("lorafleet_ttft_seconds", "time to first token", _LATENCY_BOUNDS, ("adapter",))
        self._latency = metrics.Histogram("lorafleet_latency_seconds", "request latency", _LATENCY_BOUNDS, ("adapter",))
        self._adapters = metrics.Counter("lorafleet_adapter_events", "adapter loads/evictions/rejections",
                                         ("adapter", "event"))  # fmt: skip

    def request(self, adapter: str, status: str) -> None:
        self._requests.inc(1, {"adapter": adapter, "status": status})

    def tokens(self, adapter: str, prompt: int, completion: int) -> None:
        self._tokens_in.inc(prompt, {"adapter": adapter})
        if completion:
            self._tokens_out.inc(completion, {"adapter": adapter})

    def ttft(self, adapter: str, seconds: float) -> None:
        self._ttft.observe(seconds, {"adapter": adapter})

    def latency(self, adapter: str, seconds: float) -> None:
        self._latency.observe(seconds, {"adapter": adapter})

    def adapter_event(self, adapter: str, event: str) -> None:
        self._adapters.inc(1, {"adapter": adapter, "event": event})
