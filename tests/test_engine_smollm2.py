"""The engine on the real default model (SmolLM2-135M): a mixed batch of four adapters plus base rows equals PEFT
run request by request, token for token."""

from __future__ import annotations

import pytest
from peft_reference import chat_ids, engine_greedy, peft_greedy

from adapters import native_lora
from adapters.lora_files import BaseShapes
from adapters.random_adapter import write_random_adapter
from serve_app.engine import EngineConfig, LoraEngine

pytestmark = pytest.mark.slow


def test_smollm2_mixed_batch_equals_peft(smollm2_base, tmp_path) -> None:
    shapes = BaseShapes.from_config(smollm2_base.model.config, smollm2_base.fingerprint, smollm2_base.name)
    specs = {"a": dict(rank=8, seed=1), "b": dict(rank=16, seed=2, targets=("q_proj", "v_proj", "o_proj")),
             "c": dict(rank=4, seed=3, use_rslora=True), "d": dict(rank=8, seed=4, targets=("gate_proj", "down_proj"))}  # fmt: skip
    # scale keeps the adapters' effect large enough to change answers but the text still language-like
    dirs = {n: write_random_adapter(tmp_path / n, shapes, scale=0.5, **kw) for n, kw in specs.items()}
    prompts = ["What is the capital of France?", "Give me one word that rhymes with cat.", "Count from 1 to 5."]
    names = [None, "a", "b", "c", "d"]
    requests = [
        (chat_ids(smollm2_base.tokenizer, p), names[(i + j) % 5]) for i, p in enumerate(prompts) for j in range(3)
    ]
    # on CPU: the native kernel with LoRA on the side thread (the default path of a replica with 2+ cores)
    overlap = "on" if native_lora.available() and smollm2_base.model.device.type == "cpu" else "auto"
    engine = LoraEngine(smollm2_base, EngineConfig(max_running=8, max_loras=4, max_lora_rank=16, max_seq_len=256,
                                                   prefill_chunk=32, lora_overlap=overlap))  # fmt: skip
    for name, folder in dirs.items():
        engine.register_adapter(name, folder)
    max_new = 12
    want = peft_greedy(smollm2_base, dirs, requests, max_new, engine.eos_ids)
    got, most_mixed = engine_greedy(engine, requests, max_new)
    assert got == want
    assert most_mixed >= 4
    assert len({tuple(w) for w in want}) > len(prompts)  # adapters changed some answers
    if overlap == "on":
        assert engine.runner.side.calls > 0
