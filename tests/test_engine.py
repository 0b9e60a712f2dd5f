"""The engine on the tiny model: mixed-adapter continuous batching equals PEFT run request by request, token for
token; and the engine's request lifecycle (sampling, stops, limits, aborts, adapter registration)."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft_reference import chat_ids, engine_greedy, peft_greedy

from adapters import native_lora
from adapters.lora_files import AdapterRejected
from adapters.random_adapter import write_random_adapter
from serve_app.engine import EngineConfig, LoraEngine, RequestRejected, SamplingParams

PROMPTS = ["Tell me a story about a cat.", "What is 2+2?", "Write a haiku about rain in the city at night.", "Hi",
           "List three fruits, in order of sweetness.", "Why is the sky blue? Explain it to a child, briefly."]  # fmt: skip
ADAPTERS = {  # mixed ranks (padded to the slot rank), partial targets, rsLoRA
    "r4-all": dict(rank=4, seed=1),
    "r8-qv": dict(rank=8, seed=2, targets=("q_proj", "v_proj")),
    "r16-rs": dict(rank=16, seed=3, use_rslora=True),
    "r8-mlp": dict(rank=8, seed=4, targets=("o_proj", "gate_proj", "up_proj", "down_proj")),
    "r2-kv": dict(rank=2, seed=5, targets=("k_proj", "v_proj", "down_proj")),
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base, tiny_shapes, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_random_adapter(root / name, tiny_shapes, **kw) for name, kw in ADAPTERS.items()}


def _engine(base, dirs: dict[str, Path], **config) -> LoraEngine:
    engine = LoraEngine(base, EngineConfig(**{"max_lora_rank": 16, **config}))
    for name, folder in dirs.items():
        engine.register_adapter(name, folder)
    return engine


# auto = the native C kernel on CPU (if built), in place or with LoRA on the side thread
@pytest.mark.parametrize("kernel", ["auto", "auto-side", "gather", "grouped"])
def test_mixed_batch_equals_peft_token_for_token(tiny_base, adapter_dirs, kernel: str) -> None:
    names = [None, *ADAPTERS]
    requests = [(chat_ids(tiny_base.tokenizer, p), names[(i + j) % len(names)])
                for i, p in enumerate(PROMPTS) for j in range(3)]  # fmt: skip
    max_new = 24
    overlap = "on" if kernel == "auto-side" else "off"
    if overlap == "on" and not native_lora.available():
        pytest.skip(f"the side thread needs the native kernel: {native_lora.unavailable_reason()}")
    engine = _engine(tiny_base, adapter_dirs, max_running=6, max_loras=4, prefill_chunk=16,
                     lora_kernel=kernel.removesuffix("-side"), lora_overlap=overlap)  # fmt: skip
    want = peft_greedy(tiny_base, adapter_dirs, requests, max_new, engine.eos_ids)
    got, most_mixed = engine_greedy(engine, requests, max_new)
    assert got == want
    assert most_mixed >= 4  # one decode step really held >= 4 different adapters (incl. base)
    assert engine.bank.evictions > 0  # 5 adapters through 4 slots: LRU eviction happened mid-run
    by_prompt_base = {tuple(ids): out for (ids, name), out in zip(requests, want, strict=True) if name is None}
    differs = [out != by_prompt_base[tuple(ids)] for (ids, name), out in zip(requests, want, strict=True)
               if name and tuple(ids) in by_prompt_base]  # fmt: skip
    assert differs and all(differs)  # adapters really change the output
    assert engine.stats().running == 0 and not engine.has_work()
    assert (engine.runner.side is not None and engine.runner.side.calls > 0) == (overlap == "on")


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_base, adapter_dirs) -> None:
    ids = chat_ids(tiny_base.tokenizer, "Sample me")
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)

    def run(companions: int, seed: int = 1234) -> list[int]:
        engine = _engine(tiny_base, adapter_dirs, max_running=8)
        engine.add_request("x", ids, SamplingParams(**{**params.__dict__, "seed": seed}), "r4-all")
        for i in range(companions):
            engine.add_request(f"c{i}", ids, SamplingParams(max_tokens=12, temperature=1.0), "r8-qv")
        out: list[int] = []
        while engine.has_work():
            out += [o.token_id for o in engine.step() if o.request_id == "x"]
        return out

    assert run(0) == run(3)
    assert run(0) != run(0, seed=99)


def test_finish_reasons_and_stop_strings(tiny_base, adapter_dirs) -> None:
    engine = _engine(tiny_base, adapter_dirs)
    ids = chat_ids(tiny_base.tokenizer, "Hello")
    engine.add_request("len", ids, SamplingParams(max_tokens=5, ignore_eos=True))
    full = ""
    last = None
    while engine.has_work():
        for o in engine.step():
            full += o.text
            last = o
    assert last.finish_reason == "length" and last.completion_tokens == 5
    stop = full[2:4]  # a stop string that appears in the greedy output
    engine.add_request("stop", ids, SamplingParams(max_tokens=5, stop=(stop,), ignore_eos=True))
    text, last = "", None
    while engine.has_work():
        for o in engine.step():
            text += o.text
            last = o
    assert last.finish_reason == "stop" and text == full[: full.index(stop)]


def test_rejections_name_the_problem(tiny_base, adapter_dirs, tmp_path) -> None:
    engine = _engine(tiny_base, adapter_dirs, max_seq_len=64, max_queue=2)
    with pytest.raises(RequestRejected, match="exceeds the context limit of 64") as err:
        engine.add_request("long", [5] * 60, SamplingParams(max_tokens=10))
    assert err.value.status == 400
    with pytest.raises(RequestRejected, match="not loaded") as err:
        engine.add_request("u", [5], SamplingParams(max_tokens=4), "no-such-adapter")
    assert err.value.status == 404
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request("e", [], SamplingParams(max_tokens=4))
    engine.add_request("q1", [5], SamplingParams(max_tokens=4))
    engine.add_request("q2", [5], SamplingParams(max_tokens=4))
    with pytest.raises(RequestRejected, match="queue is full") as err:
        engine.add_request("q3", [5], SamplingParams(max_tokens=4))
    assert err.value.status == 429
    big = write_random_adapter(tmp_path / "big", engine.shapes, rank=32)
    with pytest.raises(AdapterRejected, match="max_lora_rank 16"):
        engine.register_adapter("big", big)


def test_abort_frees_the_slot_and_unregister_waits_for_running_requests(tiny_base, adapter_dirs) -> None:
    engine = _engine(tiny_base, adapter_dirs, max_running=1, max_loras=1)
    ids = chat_ids(tiny_base.tokenizer, "Hello")
    engine.add_request("a", ids, SamplingParams(max_tokens=50, ignore_eos=True), "r4-all")
    engine.add_request("b", ids, SamplingParams(max_tokens=3, ignore_eos=True), "r8-qv")
    engine.step()
    engine.unregister_adapter("r4-all")  # in use: deferred
    assert "r4-all" in engine.adapters
    assert engine.abort("a")
    assert "r4-all" not in engine.adapters  # dropped once its last request ended
    finished = [o for _ in range(10) for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["b"] and finished[0].completion_tokens == 3
