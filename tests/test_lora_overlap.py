"""The engine's choice of the LoRA side thread (serve_app/engine/lora_overlap.py, `engine.lora_overlap`): `off`
never, `on` always (PyTorch's threads untouched, refused with the reason where it cannot run), `auto` by measuring,
once per model shape and batch, handing the side thread one of PyTorch's threads only if PyTorch gains less from
it than the LoRA costs -- during the engine's steps only: building an engine, or running an eval with one in a
training worker, leaves the process's thread count and no worker thread behind."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from adapters import native_lora
from serve_app.engine import EngineConfig, LoraEngine, SamplingParams, lora_overlap

pytestmark = pytest.mark.skipif(not native_lora.available(), reason=f"{native_lora.unavailable_reason()}")


@pytest.fixture
def threads():
    """PyTorch's thread count, restored after the test (the choice may lower it)."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def _engine(tiny_base, **config) -> LoraEngine:
    return LoraEngine(tiny_base, EngineConfig(**{"device": "cpu", "max_running": 8, "max_loras": 4, **config}))


def test_off_and_on(tiny_base, threads: int) -> None:
    torch.set_num_threads(1)
    assert _engine(tiny_base, lora_overlap="off").runner.side is None
    engine = _engine(tiny_base, lora_overlap="on")
    assert engine.runner.side is not None and torch.get_num_threads() == 1  # on: PyTorch's threads left alone
    assert _engine(tiny_base, lora_overlap="auto").runner.side is None  # one thread: nothing to overlap with
    with pytest.raises(ValueError, match="lora_overlap 'on'.*lora_kernel"):
        _engine(tiny_base, lora_overlap="on", lora_kernel="gather")  # a PyTorch path forced (or GPU, or bf16)


def test_on_without_the_kernel_names_the_reason(tiny_base, monkeypatch) -> None:
    monkeypatch.setenv("LORAFLEET_NATIVE_LORA", "0")
    native_lora._load.cache_clear()
    try:
        with pytest.raises(ValueError, match="lora_overlap 'on'.*LORAFLEET_NATIVE_LORA"):
            _engine(tiny_base, lora_overlap="on")
        assert _engine(tiny_base, lora_overlap="auto").runner.side is None
    finally:
        monkeypatch.undo()
        native_lora._load.cache_clear()


@pytest.mark.parametrize("side_wins", [True, False])
def test_auto_gives_the_side_thread_a_core_only_if_pytorch_does_not_use_it(tiny_base, threads: int, monkeypatch,
                                                                          side_wins: bool) -> None:  # fmt: skip
    measured = []
    monkeypatch.setattr(lora_overlap, "_measure", lambda *args: measured.append(args[1:]) or side_wins)
    monkeypatch.setattr(lora_overlap, "_decisions", {})
    torch.set_num_threads(2)
    engine = _engine(tiny_base, lora_overlap="auto", max_running=100, prefill_chunk=256)
    assert (engine.runner.side is not None) == side_wins
    assert engine.overlap.torch_threads == (1 if side_wins else None)  # the side thread takes one of PyTorch's...
    assert torch.get_num_threads() == 2  # ...during the engine's steps only
    assert measured == [(64, 4, 64, "auto", 2)]  # probe capped at 64 rows and 64 prompt tokens; 4 adapters, 2 threads
    torch.set_num_threads(2)
    _engine(tiny_base, lora_overlap="auto", max_running=100, prefill_chunk=256)
    assert len(measured) == 1  # the same model, batch and threads: measured once per process


def test_the_measurement_times_both_thread_counts_and_restores_pytorchs(tiny_base, threads: int, caplog) -> None:
    torch.set_num_threads(2)
    engine = _engine(tiny_base, lora_overlap="off")
    with caplog.at_level(logging.INFO, logger=lora_overlap.__name__):
        verdict = lora_overlap._measure(engine.runner, 8, 4, 32, "auto", 2)
    assert isinstance(verdict, bool)
    assert engine.runner.side is None and torch.get_num_threads() == 2  # restored whatever the verdict
    line = caplog.records[-1].getMessage()
    assert (
        line.startswith(f"LoRA side thread {'on' if verdict else 'off'}")
        and "faster on 2 PyTorch threads than on 1; LoRA in place adds" in line
    )


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_the_engine_takes_the_thread_only_inside_its_steps(tiny_base, threads: int, monkeypatch) -> None:
    monkeypatch.setattr(lora_overlap, "_measure", lambda *args: True)
    monkeypatch.setattr(lora_overlap, "_decisions", {})
    torch.set_num_threads(2)
    engine = _engine(tiny_base, lora_overlap="auto")
    assert engine.runner.side is not None and torch.get_num_threads() == 2
    seen, decode = [], engine.runner.decode
    monkeypatch.setattr(engine.runner, "decode", lambda *a: seen.append(torch.get_num_threads()) or decode(*a))
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert seen == [1, 1] and torch.get_num_threads() == 2  # 1 during the decode steps, 2 again after each
    engine.close()
    engine.close()  # idempotent
    assert engine.runner.side is None and engine.overlap.torch_threads is None


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")
def test_an_eval_in_a_training_worker_leaves_its_threads_as_they_were(tiny_base, threads: int, monkeypatch) -> None:
    """A training worker on 2 PyTorch threads runs quick evals (jobs.evaluate, whose engine gets the side thread):
    afterwards it trains on 2 threads again, and no eval leaves a worker thread running."""
    from jobs.config import load_config
    from jobs.evaluate import evaluate
    from jobs.task_data import load_task

    monkeypatch.setattr(lora_overlap, "_measure", lambda *args: True)
    monkeypatch.setattr(lora_overlap, "_decisions", {})
    task = load_config("jobs/configs/cpu-smollm2.yaml").task_configs()["sentiment"]
    examples = load_task("sentiment", task).eval[:2]
    torch.set_num_threads(2)
    layer = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)

    def train_step() -> int:
        optimizer.zero_grad()
        layer(torch.randn(32, 64)).square().mean().backward()
        optimizer.step()
        return torch.get_num_threads()

    sides: list[bool] = []  # whether each eval's engine got the side thread
    real_choose = lora_overlap.choose
    monkeypatch.setattr(lora_overlap, "choose", lambda *a: sides.append((o := real_choose(*a)).worker is not None) or o)
    evaluate(tiny_base, examples, task.metric, {"base": None}, max_new_tokens=3)  # warm-up: PyTorch's own pools
    before = (train_step(), _os_threads())
    for _ in range(3):
        evaluate(tiny_base, examples, task.metric, {"base": None}, max_new_tokens=3)
        assert (train_step(), _os_threads()) == before
    assert before[0] == 2 and sides == [True] * 4
