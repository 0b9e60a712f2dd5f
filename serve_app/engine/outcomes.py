"""What the engine answers besides tokens: `RequestRejected` (a request it will not run, with the HTTP status a front
end should give; `check_request`: the checks of a request's own fields) and `EngineStats` (a snapshot for metrics
and /health). Imported by serve_app/engine/engine.py,
which re-uses both names (`from serve_app.engine.engine import RequestRejected` keeps working)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    kv_blocks: int = 0  # the paged KV cache's blocks, and how many are free now
    kv_blocks_free: int = 0
    preemptions: int = 0  # sequences preempted (out of KV blocks) and recomputed so far


def check_request(prompt_ids: list[int], params: Any, max_seq_len: int, vocab_size: int) -> None:
    """Raise RequestRejected naming the field when a request cannot run (`params`: its SamplingParams)."""
    if not prompt_ids:
        raise RequestRejected("the prompt is empty", 400, "prompt")
    if params.max_tokens < 1:
        raise RequestRejected("max_tokens must be >= 1", 400, "max_tokens")
    if len(prompt_ids) + params.max_tokens > max_seq_len:
        raise RequestRejected(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context limit "
            f"of {max_seq_len} tokens",
            400,
            "max_tokens" if len(prompt_ids) < max_seq_len else "messages",
        )
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise RequestRejected("prompt holds token ids outside the vocabulary", 400, "prompt")
    if params.logit_bias and max(i for i, _ in params.logit_bias) >= vocab_size:
        raise RequestRejected("logit_bias holds token ids outside the vocabulary", 400, "logit_bias")
