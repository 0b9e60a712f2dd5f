"""A request as the engine tracks it: prompt, sampling parameters, adapter, output so far, and its state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from serve_app.engine.detokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


class State(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass
class TokenOutput:
    """What one step produced for one request. `text` is the new text (stop strings and EOS removed)."""

    request_id: str
    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    detokenizer: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    state: State = State.WAITING
    kv_slot: int = -1
    lora_slot: int = 0
    prefilled: int = 0  # prompt tokens already in the KV cache
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generator: torch.Generator | None = None

    @property
    def length(self) -> int:
        """Tokens whose K/V are (or are about to be) in the cache."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def adapter_key(self) -> str:
        return self.adapter_id or ""
