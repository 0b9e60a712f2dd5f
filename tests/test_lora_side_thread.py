"""LoRA on the side thread (adapters/lora_side_thread.py + the worker in adapters/kernels/bgmv_cpu.c): started
before the base matmuls, finished after them, it gives bit for bit what the in-place kernel gives for every adapter
row and leaves base rows alone, whoever computes which rows, whenever the worker wakes."""

from __future__ import annotations

import time

import pytest
import torch
from test_native_lora import RANK, SHAPES, _weights, needs_kernel

from adapters import native_lora
from adapters.lora_side_thread import SideWorker
from adapters.slot_bank import GROUPS, LoraSlotBank

pytestmark = needs_kernel


@pytest.fixture(scope="module")
def bank() -> LoraSlotBank:
    bank = LoraSlotBank(SHAPES, num_slots=6, max_rank=RANK)
    for slot in range(1, 7):
        bank.acquire(f"a{slot}", _weights(2 + slot % 7, seed=100 + slot))
    return bank


@pytest.fixture
def worker():
    worker = SideWorker()
    yield worker
    worker.close()


def _inputs(bank: LoraSlotBank, layer: int, group: str, rows: int, gen: torch.Generator):
    a = bank.a[group][layer]
    bs = [bank.b[p][layer] for p in GROUPS[group]]
    x = torch.randn(rows, a.shape[2], generator=gen)
    ys = [torch.randn(rows, b.shape[1], generator=gen) for b in bs]
    return a, bs, x, ys


def _expected(order: native_lora.RowOrder, a, bs, x, ys) -> list[torch.Tensor]:
    """The in-place kernel's result on copies of the outputs (the side thread must give the same bits)."""
    want = [y.clone() for y in ys]
    assert order.apply(x, a, list(zip(want, bs, strict=True)), RANK)
    return want


def _run(worker: SideWorker, order: native_lora.RowOrder, a, bs, x, ys) -> None:
    assert order.start(worker, x, a, bs, RANK)
    worker.finish(ys)


@pytest.mark.parametrize("idx", [
    [0, 3, 1, 3, 3, 0, 2],                            # base rows between adapter rows
    [5, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 1],             # runs longer than a unit (4 rows)
    [6, 1, 6, 1, 4, 0, 0, 0, 2, 5, 3] * 6,            # every slot, unsorted, 66 rows
    [0, 0, 0],                                        # no adapter row: nothing to do
])  # fmt: skip
def test_base_plus_delta_bitwise_and_base_rows_untouched(bank: LoraSlotBank, worker: SideWorker,
                                                         idx: list[int]) -> None:  # fmt: skip
    gen = torch.Generator().manual_seed(len(idx))
    order = native_lora.RowOrder(idx)
    base_rows = torch.tensor(idx) == 0
    for layer in range(SHAPES.num_layers):
        for group in GROUPS:
            a, bs, x, ys = _inputs(bank, layer, group, len(idx), gen)
            want = _expected(order, a, bs, x, ys)
            before = [y.clone() for y in ys]
            _run(worker, order, a, bs, x, ys)
            for got, ref, old in zip(ys, want, before, strict=True):
                assert torch.equal(got, ref)
                assert torch.equal(got[base_rows], old[base_rows])


def test_one_adapter_chunks_of_any_length(bank: LoraSlotBank, worker: SideWorker) -> None:
    order = native_lora.UniformRows(4, capacity=64)
    gen = torch.Generator().manual_seed(7)
    for rows in (1, 3, 4, 5, 17, 64):
        a, bs, x, ys = _inputs(bank, 1, "gate_up", rows, gen)
        want = _expected(order, a, bs, x, ys)
        _run(worker, order, a, bs, x, ys)
        assert all(torch.equal(g, w) for g, w in zip(ys, want, strict=True))
    a, bs, x, _ = _inputs(bank, 1, "gate_up", 65, gen)
    assert not order.start(worker, x, a, bs, RANK)  # more rows than the plan holds: refused, nothing started


def test_many_calls_and_a_worker_that_slept(bank: LoraSlotBank, worker: SideWorker) -> None:
    """Hundreds of back-to-back calls of varied sizes (the caller and the worker race for units), with pauses
    long enough for the worker to go to sleep (2 ms of spinning) in between: every result exact."""
    gen = torch.Generator().manual_seed(3)
    groups = list(GROUPS)
    for i in range(300):
        idx = torch.randint(0, 7, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
        order = native_lora.RowOrder(idx)
        a, bs, x, ys = _inputs(bank, i % 2, groups[i % len(groups)], len(idx), gen)
        want = _expected(order, a, bs, x, ys)
        if i % 50 == 0:
            time.sleep(0.01)
        _run(worker, order, a, bs, x, ys)
        assert all(torch.equal(g, w) for g, w in zip(ys, want, strict=True)), f"call {i}: {idx}"


def test_outputs_the_c_side_cannot_address_are_added_by_pytorch(bank: LoraSlotBank, worker: SideWorker) -> None:
    idx = [1, 0, 2, 2]
    order = native_lora.RowOrder(idx)
    a, bs, x, ys = _inputs(bank, 0, "o", 4, torch.Generator().manual_seed(5))
    want = _expected(order, a, bs, x, ys)
    strided = torch.zeros(ys[0].shape[1], 4).T  # columns not contiguous
    strided.copy_(ys[0])
    _run(worker, order, a, bs, x, [strided])
    torch.testing.assert_close(strided, want[0])  # (PyTorch's add: same values, maybe not the same bits)
    wrong_width = torch.randn(4, 3)
    with pytest.raises(ValueError):
        _run(worker, order, a, bs, x, [wrong_width])  # a tensor that cannot be the output: refused, not written


def test_a_call_never_finished_is_waited_for_before_the_next(bank: LoraSlotBank, worker: SideWorker) -> None:
    """An exception between start and finish (in the base matmuls) leaves a call in flight: the next start waits
    for it and still computes its own result exactly; its tensors stayed alive meanwhile."""
    gen = torch.Generator().manual_seed(9)
    order = native_lora.RowOrder([1, 2, 3, 4])
    a, bs, x, _ = _inputs(bank, 0, "qkv", 4, gen)
    assert order.start(worker, x, a, bs, RANK)
    del x  # only the worker holds it now
    a, bs, x, ys = _inputs(bank, 1, "qkv", 4, gen)
    want = _expected(order, a, bs, x, ys)
    _run(worker, order, a, bs, x, ys)
    assert all(torch.equal(g, w) for g, w in zip(ys, want, strict=True))


def test_a_closed_worker_refuses_calls(bank: LoraSlotBank) -> None:
    worker = SideWorker()
    worker.close()
    worker.close()  # idempotent
    a, bs, x, _ = _inputs(bank, 0, "o", 2, torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="closed"):
        native_lora.RowOrder([1, 2]).start(worker, x, a, bs, RANK)


def test_a_slot_the_weights_do_not_have_is_refused_before_the_worker_runs(bank: LoraSlotBank,
                                                                          worker: SideWorker) -> None:  # fmt: skip
    """A plan built without the slot count (no slot bank given) meets the side thread's weights: its highest slot
    is checked against them before the call is handed to C (10**12 would crash the process there)."""
    a, bs, x, ys = _inputs(bank, 0, "o", 3, torch.Generator().manual_seed(2))
    before = ys[0].clone()
    with pytest.raises(IndexError, match="slot 1000000000000 is out of range for weights with 7 slots"):
        native_lora.RowOrder([1, 10**12, 0]).start(worker, x, a, bs, RANK)
    assert worker.calls == 0 and torch.equal(ys[0], before)
    _run(worker, native_lora.RowOrder([1, 6, 0]), a, bs, x, ys)  # the worker still takes good calls
    assert worker.calls == 1 and not torch.equal(ys[0], before)
