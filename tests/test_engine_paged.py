"""The engine on its paged KV cache (issue 22 item 2), on the tiny random Llama on CPU: batched multi-sequence prefill
equals prompts run one at a time; mixed adapters with preemption (KV blocks too few for every running sequence)
equal PEFT token for token; every block is back on the free list when the engine is idle; `max_loras` per step and
fairness across adapters still hold when KV blocks bind; a decode step syncs with the host once; the Triton
paged-decode kernel in the engine (under the interpreter, in a subprocess: tests/paged_engine_case.py) gives the
PyTorch path's tokens; the KV settings are checked by name.

    .venv/bin/python -m pytest -q tests/test_engine_paged.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cpu_engine import cpu_engine, write_adapters
from peft_reference import chat_ids, engine_greedy, peft_greedy

from serve_app.engine import EngineConfig, LoraEngine, SamplingParams

PROMPTS = ["Hi", "What is 2+2?", "Tell me a story about a cat, a dog and a very small mouse.", "List three fruits.",
           "Why is the sky blue? Explain it to a child, briefly, in two or three sentences."]  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {"a": dict(rank=4, seed=11), "b": dict(rank=8, seed=12, targets=("q_proj", "v_proj", "down_proj")),
            "c": dict(rank=16, seed=13, use_rslora=True)}  # fmt: skip


@pytest.fixture(scope="module")
def adapter_dirs(tiny_shapes: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paged-adapters")
    return write_adapters(root, tiny_shapes, ADAPTERS)


def _prefill_widths(engine: LoraEngine) -> list[int]:
    """Record how many sequences each prefill forward holds (chunks = runs of consecutive positions)."""
    widths: list[int] = []
    real = engine.runner.prefill

    def counting(tokens: torch.Tensor, positions: torch.Tensor, *rest: Any) -> torch.Tensor:
        widths.append(1 + int((positions[1:] != positions[:-1] + 1).sum()))
        return real(tokens, positions, *rest)

    engine.runner.prefill = counting  # type: ignore[method-assign]
    return widths


def _run(engine: LoraEngine, requests: list[tuple[list[int], str | None]], params: SamplingParams) -> list[list[int]]:
    for i, (ids, name) in enumerate(requests):
        engine.add_request(str(i), ids, params, name)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id].append(o.token_id)
    assert engine.kv.num_free == engine.kv.num_blocks  # every block back when idle
    return [out[str(i)] for i in range(len(requests))]


def test_batched_prefill_equals_one_prompt_at_a_time(tiny_base: Any, adapter_dirs: dict[str, Path]) -> None:
    """Several prompts of different lengths (varlen) and adapters in one prefill forward, chunked (chunks that
    continue a prompt attend to its earlier blocks), give the same tokens as one request at a time, greedy and
    seeded sampling alike."""
    names = [None, "a", "b", "c", "a"]
    requests = [(chat_ids(tiny_base.tokenizer, p), names[i]) for i, p in enumerate(PROMPTS)]
    assert len({len(ids) for ids, _ in requests}) == len(requests)
    for params in (SamplingParams(max_tokens=10, ignore_eos=True),
                   SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, top_p=0.9, seed=7)):  # fmt: skip
        alone = cpu_engine(tiny_base, adapter_dirs, max_running=1)
        want = [_run(alone, [r], params)[0] for r in requests]
        batched = cpu_engine(tiny_base, adapter_dirs, max_running=8, prefill_chunk=16, prefill_token_budget=128)
        widths = _prefill_widths(batched)
        assert _run(batched, requests, params) == want
        assert max(widths) == len(requests)  # every prompt in one forward
        assert len(widths) > 1  # and prompts longer than a chunk took several steps


def test_preemption_recomputes_with_identical_tokens_equal_to_peft(tiny_base: Any,
                                                                   adapter_dirs: dict[str, Path]) -> None:  # fmt: skip
    """Too few KV blocks for every running sequence: the youngest are preempted and recomputed; greedy tokens still
    equal PEFT's request by request, and all blocks return to the free list."""
    names = [None, "a", "b", "c"]
    requests = [(chat_ids(tiny_base.tokenizer, p), names[(i + j) % 4]) for i, p in enumerate(PROMPTS[:4])
                for j in range(2)]  # fmt: skip
    engine = cpu_engine(tiny_base, adapter_dirs, max_running=8, max_loras=3, num_kv_blocks=12, prefill_chunk=32,
                     prefill_token_budget=96)  # fmt: skip
    max_new = 16
    want = peft_greedy(tiny_base, adapter_dirs, requests, max_new, engine.eos_ids)
    got, most_mixed = engine_greedy(engine, requests, max_new)
    assert got == want
    assert engine.preemptions > 0 and most_mixed >= 3
    assert engine.kv.num_free == engine.kv.num_blocks and engine.stats().kv_blocks_free == 12


def test_max_loras_and_fairness_hold_when_kv_blocks_bind(tiny_base: Any, adapter_dirs: dict[str, Path]) -> None:
    """A hot adapter with many queued requests does not crowd out the others, no step runs more than max_loras
    adapters, and an aborted request's blocks come back."""
    engine = cpu_engine(tiny_base, adapter_dirs, max_running=4, max_loras=2, num_kv_blocks=10)
    ids = chat_ids(tiny_base.tokenizer, "Hello there")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"hot{i}", ids, params, "a")
    engine.add_request("cold-b", ids, params, "b")
    engine.add_request("cold-c", ids, params, "c")
    first_token: dict[str, int] = {}
    step = 0
    while engine.has_work():
        for o in engine.step():
            first_token.setdefault(o.request_id, step)
        step += 1
        running = {s.adapter_id for s in engine._running if s.adapter_id}
        assert len(running) <= 2
    assert first_token["cold-b"] < first_token["hot3"] and first_token["cold-c"] <= first_token["hot3"]  # not FIFO
    assert engine.kv.num_free == 10
    engine.add_request("gone", ids, SamplingParams(max_tokens=50, ignore_eos=True), "a")
    engine.step()
    assert engine.kv.num_free < 10 and engine.abort("gone") and engine.kv.num_free == 10


def test_a_decode_step_syncs_with_the_host_once(tiny_base: Any, adapter_dirs: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Mixed adapters, greedy and sampled rows, logprobs: one device-to-host transfer per decode step."""
    engine = cpu_engine(tiny_base, adapter_dirs, max_running=4)
    ids = chat_ids(tiny_base.tokenizer, "Count to ten")
    engine.add_request("g", ids, SamplingParams(max_tokens=8, ignore_eos=True), "a")
    engine.add_request("s", ids, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.7, seed=3,
                                                top_k=20, logprobs=2), "b")  # fmt: skip
    engine.add_request("p", ids, SamplingParams(max_tokens=8, ignore_eos=True, presence_penalty=0.5))
    engine.step()  # the prefill
    syncs: list[str] = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: syncs.append(_name)
                            or _real(self, *a))  # fmt: skip
    outputs = engine.step()
    monkeypatch.undo()
    assert len(outputs) == 3 and syncs == ["tolist"]
    sampled = next(o for o in outputs if o.request_id == "s")
    assert sampled.logprob is not None and len(sampled.top_logprobs) == 2


def test_kv_settings_are_checked_by_name(tiny_base: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="kv_block_size must be a power of two, got 24"):
        EngineConfig(kv_block_size=24)
    with pytest.raises(ValidationError, match=r"num_kv_blocks \(3\) must hold one sequence of max_seq_len"):
        EngineConfig(max_seq_len=64, kv_block_size=16, num_kv_blocks=3)
    assert EngineConfig(max_running=4, max_seq_len=100, kv_block_size=32).kv_blocks == 4 * 4
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="decode_attention 'triton'"):
        LoraEngine(tiny_base, EngineConfig(device="cpu", max_seq_len=64, decode_attention="triton"))


def _case(device: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "paged_engine_case.py"), "--device", device],
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_engine_with_the_triton_paged_decode_kernel_under_the_interpreter() -> None:
    result = _case("cpu", {"TRITON_INTERPRET": "1"})
    assert result["tokens"]["triton"] == result["tokens"]["torch"]
    assert result["preemptions"]["triton"] > 0


@pytest.mark.gpu
def test_engine_with_the_triton_paged_decode_kernel_on_cuda() -> None:
    result = _case("cuda", {})
    assert result["tokens"]["triton"] == result["tokens"]["torch"]
