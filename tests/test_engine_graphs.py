"""Decode on static buffers for CUDA graphs (issue 22 item 3, serve_app/engine/decode_graphs.py) on the tiny random
Llama. On CPU the step a graph captures runs eagerly (`cuda_graphs: static_eager`): it gives the eager engine's
tokens for mixed adapters at padded ladder sizes, with sequences finishing mid-batch and a preemption; padded rows
write only the scratch block (no live KV block changes but the rows' own slots); the ladder picks the smallest size
that holds the batch; the settings are checked by name; a capture that fails falls back to eager decoding with a
warning; the static step on the Triton kernels (under the interpreter) gives the eager engine's tokens on them. On
CUDA (`gpu` mark) the captured graphs give the eager engine's tokens.

    .venv/bin/python -m pytest -q tests/test_engine_graphs.py
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cpu_engine import cpu_engine, write_adapters
from peft_reference import chat_ids
from pydantic import ValidationError

from serve_app.engine import EngineConfig, LoraEngine, SamplingParams, decode_graphs

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Hi", "What is 2+2?", "Tell me a story about a cat.", "List three fruits.", "Why is the sky blue?"]
ADAPTERS = {"a": dict(rank=4, seed=21), "b": dict(rank=8, seed=22, targets=("q_proj", "v_proj", "down_proj")),
            "c": dict(rank=16, seed=23, use_rslora=True)}  # fmt: skip
NAMES = [None, "a", "b", "c", "a"]
MAX_TOKENS = [3, 14, 6, 14, 9]  # rows finish at different steps: the live batch shrinks 5 -> 4 -> 3 -> 2


@pytest.fixture(scope="module")
def adapter_dirs(tiny_shapes: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graph-adapters")
    return write_adapters(root, tiny_shapes, ADAPTERS)


def _run(engine: LoraEngine, requests: list[tuple[list[int], str | None, int]]) -> list[list[int]]:
    for i, (ids, name, max_tokens) in enumerate(requests):
        engine.add_request(str(i), ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), name)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id].append(o.token_id)
    assert engine.kv.num_free == engine.kv.num_blocks
    return [out[str(i)] for i in range(len(requests))]


def _sizes(engine: LoraEngine) -> list[tuple[int, int]]:
    """Record (live rows, ladder size) of every static decode step."""
    seen: list[tuple[int, int]] = []
    static = engine.static_decode
    assert static is not None
    real = static.run

    def recording(rows: list[Any]) -> torch.Tensor | None:
        logits = real(rows)
        seen.append((len(rows), static.last_size))
        return logits

    static.run = recording  # type: ignore[method-assign]
    return seen


def test_ladder_picks_the_smallest_size_that_holds_the_batch() -> None:
    assert decode_graphs.ladder(1) == [1]
    assert decode_graphs.ladder(16) == [1, 2, 4, 8, 16]
    sizes = decode_graphs.ladder(12)
    assert sizes == [1, 2, 4, 8, 12]
    assert [decode_graphs.pick(sizes, n) for n in (1, 2, 3, 4, 5, 8, 9, 12)] == [1, 2, 4, 4, 8, 8, 12, 12]
    assert decode_graphs.pick(sizes, 13) is None  # above the ladder: the engine decodes eagerly


def test_static_decode_equals_the_eager_engine(tiny_base: Any, adapter_dirs: dict[str, Path]) -> None:
    """Mixed adapters, rows finishing mid-batch, KV blocks too few for every sequence (a preemption): the static
    step at padded sizes gives the eager engine's tokens, request by request."""
    requests = [(chat_ids(tiny_base.tokenizer, p), NAMES[i], MAX_TOKENS[i]) for i, p in enumerate(PROMPTS)]
    config = dict(max_running=5, max_loras=3, num_kv_blocks=10, prefill_chunk=32, prefill_token_budget=96)
    eager = cpu_engine(tiny_base, adapter_dirs, **config)
    assert eager.static_decode is None
    want = _run(eager, requests)
    static = cpu_engine(tiny_base, adapter_dirs, cuda_graphs="static_eager", **config)
    assert static.static_decode is not None and static.static_decode.sizes == [1, 2, 4, 5]
    seen = _sizes(static)
    assert _run(static, requests) == want
    assert [len(t) for t in want] == MAX_TOKENS
    assert static.preemptions > 0 and eager.preemptions > 0
    assert all(size == decode_graphs.pick([1, 2, 4, 5], live) for live, size in seen)
    assert (3, 4) in seen and any(live < size for live, size in seen)  # padded rows really ran


def test_padded_rows_touch_only_the_scratch_block(tiny_base: Any, adapter_dirs: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Three live rows padded to four: after the decode step the K/V cache differs only at the live rows' write
    slots and in the scratch block, which no sequence holds; the step syncs with the host once (the sampler's)."""
    engine = cpu_engine(tiny_base, adapter_dirs, max_running=4, prefill_chunk=128, prefill_token_budget=512,
                     cuda_graphs="static_eager")  # fmt: skip
    kv = engine.kv
    assert kv.scratch_block == kv.num_blocks and kv.k.shape[1] == kv.num_blocks + 1
    for i, name in enumerate(("a", None, "c")):
        engine.add_request(str(i), chat_ids(tiny_base.tokenizer, PROMPTS[i]), SamplingParams(max_tokens=20), name)
    engine.step()  # every prompt prefilled
    rows = list(engine._decode)
    assert len(rows) == 3
    k_before, v_before = kv.k.clone(), kv.v.clone()
    syncs: list[str] = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: syncs.append(_name)
                            or _real(self, *a))  # fmt: skip
    outputs = engine.step()  # decode only
    monkeypatch.undo()
    assert len(outputs) == 3 and syncs == ["tolist"]
    assert engine.static_decode is not None and engine.static_decode.last_size == 4
    changed = ((kv.k != k_before) | (kv.v != v_before)).flatten(3).any(-1).any(0)  # [blocks + 1, block_size]
    bs = kv.block_size
    written = set()
    for seq in rows:
        table, position = kv.table(seq.request_id), seq.length - 2  # the token this step wrote
        assert kv.scratch_block not in table
        written.add((table[position // bs], position % bs))
    live = {(int(b), int(o)) for b, o in changed[: kv.num_blocks].nonzero().tolist()}
    assert live == written  # nothing else in any live block moved
    assert changed[kv.scratch_block, 0]  # the padded row wrote its token at the scratch block


def test_settings_are_checked_by_name(tiny_base: Any) -> None:
    with pytest.raises(ValidationError, match="cuda_graphs 'on' needs a CUDA device"):
        EngineConfig(device="cpu", cuda_graphs="on")
    with pytest.raises(ValidationError, match="cuda_graphs"):
        EngineConfig(cuda_graphs="sometimes")
    with pytest.raises(ValueError, match="engine.cuda_graphs 'on' needs a CUDA device"):
        decode_graphs.resolve_mode(EngineConfig(cuda_graphs="on"), torch.device("cpu"), False)
    assert decode_graphs.resolve_mode(EngineConfig(), torch.device("cuda"), True) == "graphs"
    assert decode_graphs.resolve_mode(EngineConfig(), torch.device("cuda"), False) == "off"
    assert decode_graphs.resolve_mode(EngineConfig(), torch.device("cpu"), True) == "off"
    assert EngineConfig(max_running=8, cuda_graph_max_batch=32).graph_max_batch == 8
    assert EngineConfig(max_running=8, cuda_graph_max_batch=3).graph_max_batch == 3
    engine = LoraEngine(tiny_base, EngineConfig(device="cpu", max_seq_len=64, lora_overlap="off"))
    assert engine.static_decode is None and engine.kv.scratch_block is None  # auto on CPU: off, no scratch block


def test_a_failed_capture_falls_back_to_eager(tiny_base: Any, adapter_dirs: dict[str, Path],
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Capturing on a machine without CUDA raises: the engine logs why and decodes eagerly, same tokens."""
    requests = [(chat_ids(tiny_base.tokenizer, p), NAMES[i], 4) for i, p in enumerate(PROMPTS[:2])]
    want = _run(cpu_engine(tiny_base, adapter_dirs, max_running=2), requests)
    monkeypatch.setattr(decode_graphs, "resolve_mode", lambda *args: "graphs")
    with caplog.at_level(logging.WARNING, logger="serve_app.engine.decode_graphs"):
        engine = cpu_engine(tiny_base, adapter_dirs, max_running=2)
    assert engine.static_decode is None
    assert "capturing the decode step failed" in caplog.text and "decoding eagerly" in caplog.text
    assert _run(engine, requests) == want


def test_static_decode_on_the_triton_kernels_under_the_interpreter() -> None:
    """The static step with Triton paged attention (static block tables) and BGMV LoRA (static slot tensor), the
    kernels a CUDA graph captures, gives the eager engine's tokens on the same kernels (tests/graphs_engine_case.py,
    in a subprocess: the interpreter must be set before triton is imported)."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "graphs_engine_case.py")], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["tokens"]["static_eager"] == result["tokens"]["off"]
    assert [len(t) for t in result["tokens"]["off"]] == [5, 3, 5]
    assert [3, 4] in result["sizes"] and [2, 2] in result["sizes"]  # padded, then one row fewer after a finish


@pytest.mark.gpu
def test_captured_graphs_equal_eager_decoding_on_cuda(adapter_dirs: dict[str, Path]) -> None:
    """On CUDA (float32, Triton attention and LoRA when triton imports): graphs captured for every ladder size, and
    the engine's tokens with graphs equal its tokens without, with padding, a finish mid-batch and a preemption."""
    from adapters.base_models import load_base

    base = load_base("tiny-llama", device="cuda", dtype="float32")
    requests = [(chat_ids(base.tokenizer, p), NAMES[i], MAX_TOKENS[i]) for i, p in enumerate(PROMPTS)]
    config = dict(device="cuda", dtype="float32", max_running=5, max_loras=3, num_kv_blocks=10, prefill_chunk=32,
                  prefill_token_budget=96)  # fmt: skip
    want = _run(cpu_engine(base, adapter_dirs, cuda_graphs="off", **config), requests)
    engine = cpu_engine(base, adapter_dirs, cuda_graphs="on", **config)
    assert engine.static_decode is not None and sorted(engine.static_decode.graphs) == [1, 2, 4, 5]
    seen = _sizes(engine)
    assert _run(engine, requests) == want
    assert engine.preemptions > 0 and (3, 4) in seen
