"""Timed runs of one `Workload` through the engine or through PEFT + Hugging Face `generate`.

Each runner returns a `Sample`: generated tokens, wall and process-CPU seconds, and the most distinct adapters
one forward saw (proof that a "mixed" case really mixed). Every runner decodes greedily for exactly `max_new_tokens` per request:
the engine with `ignore_eos`, `generate` with `min_new_tokens == max_new_tokens`; the token count is checked.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.workload import Workload
from serve_app.engine import LoraEngine, SamplingParams

PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in `adapter_names`


@dataclass(frozen=True)
class Sample:
    tokens: int
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time (all threads): unlike wall time, not inflated by other processes
    most_mixed: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds if self.cpu_seconds > 0 else 0.0


class _Timer:
    """Wall and process-CPU time of a `with` block."""

    def __enter__(self) -> _Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = time.process_time() - self._cpu


class TokenCountMismatch(RuntimeError):
    """A runner generated a different number of tokens than the workload asks for (the cases would not compare)."""


def _check(work: Workload, tokens: int, runner: str) -> None:
    if tokens != work.generated_tokens:
        raise TokenCountMismatch(
            f"{runner} generated {tokens} tokens for {work.name}, expected {work.generated_tokens}"
        )


# -- the engine ------------------------------------------------------------------------------------------------
class EngineRunner:
    """Every request of a workload added at once (all in flight together), stepped until done."""

    def __init__(self, engine: LoraEngine) -> None:
        self.engine = engine
        self._runs = 0

    def run(self, work: Workload) -> Sample:
        engine = self.engine
        self._runs += 1
        params = SamplingParams(max_tokens=work.max_new_tokens, ignore_eos=True)
        adapter_of = {f"r{self._runs}-{i}": name for i, name in enumerate(work.adapters)}
        tokens = most_mixed = widest = 0
        with _Timer() as timer:
            for (rid, name), ids in zip(adapter_of.items(), work.prompts, strict=True):
                engine.add_request(rid, ids, params, name)
            while engine.has_work():
                outs = engine.step()
                tokens += sum(o.token_id is not None for o in outs)
                if len(outs) > widest:  # (cheap: only when a step is wider than any before)
                    widest = len(outs)
                    most_mixed = max(most_mixed, len({adapter_of[o.request_id] for o in outs} - {None}))
        _check(work, tokens, "engine")
        return Sample(tokens, timer.seconds, timer.cpu_seconds, most_mixed)


# -- PEFT ------------------------------------------------------------------------------------------------------
def peft_model(base_model: Any, adapters: dict[str, Path]) -> Any:
    """A PeftModel over a deep copy of `base_model` (the engine keeps using the untouched original)."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


class PeftRunner:
    """PEFT + `generate`: one mixed batch (`adapter_names=`), or one batch per adapter (`set_adapter`)."""

    def __init__(self, model: Any, pad_id: int) -> None:
        self.model = model
        self.pad_id = pad_id

    def _generate(self, prompts: list[list[int]], new_tokens: int, **kwargs: Any) -> int:
        ids, mask = (t.to(self.model.device) for t in left_pad(prompts, self.pad_id))  # CUDA: inputs on the GPU
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad_id,
                                      **kwargs)  # fmt: skip
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    def mixed(self, work: Workload) -> Sample:
        names = [name or PEFT_BASE for name in work.adapters]
        with _Timer() as timer:
            tokens = self._generate(work.prompts, work.max_new_tokens, adapter_names=names)
        _check(work, tokens, "peft mixed")
        return Sample(tokens, timer.seconds, timer.cpu_seconds, work.distinct_adapters)

    def swap(self, work: Workload) -> Sample:
        groups: dict[str | None, list[list[int]]] = defaultdict(list)
        for prompt, name in zip(work.prompts, work.adapters, strict=True):
            groups[name].append(prompt)
        tokens = 0
        with _Timer() as timer:
            for name, prompts in groups.items():
                if name is None:
                    with self.model.disable_adapter():
                        tokens += self._generate(prompts, work.max_new_tokens)
                else:
                    self.model.set_adapter(name)
                    tokens += self._generate(prompts, work.max_new_tokens)
        _check(work, tokens, "peft swap")
        return Sample(tokens, timer.seconds, timer.cpu_seconds, 1 if work.distinct_adapters else 0)

    def base(self, work: Workload) -> Sample:
        """Plain HF `generate` on the base model (adapters disabled): the Hugging Face reference point."""
        with _Timer() as timer, self.model.disable_adapter():
            tokens = self._generate(work.prompts, work.max_new_tokens)
        _check(work, tokens, "hf base")
        return Sample(tokens, timer.seconds, timer.cpu_seconds, 0)
