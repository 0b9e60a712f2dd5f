"""Reference outputs for engine tests: each request alone through PEFT + HF `generate` (greedy), and helpers to
run the same requests through the engine in one mixed batch."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from serve_app.engine import LoraEngine, SamplingParams


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def peft_greedy(base: Any, adapters: dict[str, Path], requests: list[tuple[list[int], str | None]],
                max_new_tokens: int, eos_ids: set[int]) -> list[list[int]]:  # fmt: skip
    """Run each (prompt ids, adapter name or None) alone; return generated ids up to (not including) EOS."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    outputs = []
    for ids, name in requests:
        inputs = torch.tensor([ids])
        with torch.no_grad():
            if name is None:
                with model.disable_adapter():
                    out = model.generate(input_ids=inputs, max_new_tokens=max_new_tokens, do_sample=False)
            else:
                model.set_adapter(name)
                out = model.generate(input_ids=inputs, max_new_tokens=max_new_tokens, do_sample=False)
        gen = out[0, inputs.shape[1] :].tolist()
        outputs.append(gen[: next((i for i, t in enumerate(gen) if t in eos_ids), len(gen))])
    return outputs


def engine_greedy(engine: LoraEngine, requests: list[tuple[list[int], str | None]], max_new_tokens: int
                  ) -> tuple[list[list[int]], int]:  # fmt: skip
    """All requests at once through the engine; returns ids per request and the most distinct adapters seen
    in one step (proof the batch really was mixed)."""
    for i, (ids, name) in enumerate(requests):
        engine.add_request(str(i), ids, SamplingParams(max_tokens=max_new_tokens), name)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    adapter_of = {str(i): name for i, (_, name) in enumerate(requests)}
    most_mixed = 0
    while engine.has_work():
        outs = engine.step()
        most_mixed = max(most_mixed, len({adapter_of[o.request_id] for o in outs}))
        for o in outs:
            if not (o.finished and o.finish_reason == "stop" and o.token_id in engine.eos_ids):
                got[o.request_id].append(o.token_id)
    return [got[str(i)] for i in range(len(requests))], most_mixed
