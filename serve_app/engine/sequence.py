"""A request as the engine tracks it: prompt, sampling parameters, adapter, output so far, and its state; and
`TokenOutput`, what one step produced for one request (text, token id, logprobs, finish reason or error)."""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from serve_app.engine.detokenizer import IncrementalDetokenizer

# (token id, logprob) pairs, most likely first
TopLogprobs = list[tuple[int, float]]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0  # OpenAI: minus this for each token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # CTRL/HF: divide positive (multiply negative) logits of prompt+output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # added to the logits before sampling
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for each prompt token (from the prefill)
    json_schema: str | None = None  # constrain the output to JSON: "" = any JSON object, else a JSON schema
    deadline_s: float | None = None  # the request ends with an error (504) this long after it arrived

    @property
    def needs_processing(self) -> bool:
        """True when the logits are changed before the choice (penalties, bias, grammar)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        ) or (self.json_schema is not None)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], max_tokens: int, deadline_s: float | None) -> SamplingParams:
        """From a request payload (serve_app/model_service.py; validated by the API's request models)."""
        fmt = payload.get("response_format")
        schema = None if fmt is None else (json.dumps(fmt["schema"]) if fmt.get("schema") is not None else "")
        return cls(
            max_tokens=int(max_tokens),
            temperature=float(payload.get("temperature") or 0.0),
            top_p=float(payload.get("top_p") or 1.0),
            stop=tuple(payload.get("stop") or ()),
            seed=payload.get("seed"),
            ignore_eos=bool(payload.get("ignore_eos")),
            top_k=int(payload.get("top_k") or 0),
            presence_penalty=float(payload.get("presence_penalty") or 0.0),
            frequency_penalty=float(payload.get("frequency_penalty") or 0.0),
            repetition_penalty=float(payload.get("repetition_penalty") or 1.0),
            logit_bias=tuple(sorted((int(k), float(v)) for k, v in (payload.get("logit_bias") or {}).items())),
            logprobs=payload.get("logprobs"),
            prompt_logprobs=payload.get("prompt_logprobs"),
            json_schema=schema,
            deadline_s=deadline_s,
        )


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
    logprob: float | None = None  # of token_id, when the request asked for logprobs
    top_logprobs: TopLogprobs | None = None
    prompt_logprobs: list[tuple[float | None, TopLogprobs]] | None = None  # per prompt token, in the first output
    eos: bool = False  # token_id is an end-of-sequence token (not part of the text or the output ids)
    stop_string: bool = False  # finished on a stop string
    error_status: int = 500
    error_code: str | None = None

    @classmethod
    def for_token(cls, seq: Sequence, token: int, text: str, reason: str | None, eos: bool) -> TokenOutput:
        """The output for a token `seq` just sampled, with the logprobs the sampler recorded for it."""
        out = cls(seq.request_id, token, text, reason is not None, reason, len(seq.prompt_ids), len(seq.output_ids),
                  logprob=seq.last_logprob, top_logprobs=seq.last_top, eos=eos,
                  stop_string=reason == "stop" and not eos)  # fmt: skip
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            out.prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        return out

    @classmethod
    def expired(cls, seq: Sequence) -> TokenOutput:
        """The final output of a request that ran past its deadline."""
        return cls(seq.request_id, None, "", True, "error", len(seq.prompt_ids), len(seq.output_ids),
                   error=f"the request ran past the server's deadline of {seq.params.deadline_s:g} s and was ended",
                   error_status=504, error_code="deadline_exceeded")  # fmt: skip


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    detokenizer: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    state: State = State.WAITING
    lora_slot: int = 0
    prefilled: int = 0  # tokens already in the KV cache (of `prefill_target`)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    constraint: Any = None  # a grammar matcher (serve_app/engine/constraints.py) for JSON output
    last_logprob: float | None = None  # set by the sampler for the token it just chose
    last_top: TopLogprobs | None = None
    prompt_logprobs: list[tuple[float | None, TopLogprobs]] | None = None  # filled during prefill when asked
    prompt_logprobs_sent: bool = False

    @property
    def length(self) -> int:
        """Tokens whose K/V are (or are about to be) in the cache."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_target(self) -> int:
        """Tokens to prefill: the prompt; after a preemption (recomputation), prompt + output but its last token,
        which the next decode step feeds."""
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of prompt + output."""
        prompt = len(self.prompt_ids)
        return self.prompt_ids[start:end] + self.output_ids[max(start - prompt, 0) : max(end - prompt, 0)]

    @property
    def adapter_key(self) -> str:
        return self.adapter_id or ""

    def overdue(self, now: float) -> bool:
        return self.params.deadline_s is not None and now - self.arrival > self.params.deadline_s
