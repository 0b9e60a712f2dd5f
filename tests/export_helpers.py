"""Shared by the export tests: the adapter's prompt metadata, the prompts, and the serving engine's greedy tokens
(the reference every export is compared with). Not a test module; imported by tests/test_export*.py.
"""

from __future__ import annotations

from pathlib import Path

from serve_app.engine import EngineConfig, LoraEngine, SamplingParams

PROMPT_META = {"mode": "chat", "system_prompt": "Answer with one word: positive or negative.", "stop": ["\n\n"]}
PROMPTS = ["hello world", "The quick brown fox", "<|im_start|>user\nsum 2+2<|im_end|>\n<|im_start|>assistant\n"]


def engine_greedy(base, adapter_dir: Path | None, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens from the serving engine (the reference every export is compared with)."""
    config = EngineConfig(device="cpu", dtype="float32", max_running=len(prompts), max_seq_len=256, max_lora_rank=64,
                          lora_overlap="off")  # fmt: skip
    engine = LoraEngine(base, config)
    if adapter_dir is not None:
        engine.register_adapter("a", adapter_dir)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, SamplingParams(max_tokens=n, ignore_eos=True), "a" if adapter_dir else None)
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            if out.token_id is not None:
                tokens[int(out.request_id)].append(out.token_id)
    engine.close()
    return [tokens[i] for i in range(len(prompts))]
