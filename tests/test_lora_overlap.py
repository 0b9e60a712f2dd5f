"""The engine's choice of the LoRA side thread (serve_app/engine/lora_overlap.py, `engine.lora_overlap`): `off`
never, `on` always (PyTorch's threads untouched, refused with the reason where it cannot run), `auto` by measuring,
once per model shape and batch, handing the side thread one of PyTorch's threads only if PyTorch gains less from
it than the LoRA costs."""

from __future__ import annotations

import logging

import pytest
import torch

from adapters import native_lora
from serve_app.engine import EngineConfig, LoraEngine, lora_overlap

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
    assert torch.get_num_threads() == (1 if side_wins else 2)  # the side thread took one of PyTorch's
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
