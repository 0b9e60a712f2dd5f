"""What the engine answers besides tokens: `RequestRejected` (a request it will not run, with the HTTP status a front
end should give) and `EngineStats` (a snapshot for metrics and /health). Imported by serve_app/engine/engine.py,
which re-uses both names (`from serve_app.engine.engine import RequestRejected` keeps working)."""

from __future__ import annotations

from dataclasses import dataclass


class RequestRejected(ValueError):
    """A request the engine will not run. `status` is the HTTP status a front end should answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class EngineStats:
    running: int
    waiting: int
    resident_adapters: list[str]
    registered_adapters: int
    adapter_loads: int
    adapter_evictions: int
    steps: int
    generated_tokens: int
