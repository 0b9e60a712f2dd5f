"""The batched-LoRA operator against a float64 per-row reference, and the slot bank it reads from."""

from __future__ import annotations

import pytest
import torch

from adapters.batched_lora import LoraBatch, apply_lora
from adapters.lora_files import BaseShapes, LoraAdapterConfig, LoraWeights
from adapters.lora_reference import expand_reference, shrink_reference
from adapters.slot_bank import LoraSlotBank, NoFreeSlot


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("seed", range(4))
def test_mixed_batch_matches_per_row_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    slots, rank, rows = 6, 8, 17
    a = torch.randn(slots, 2 * rank, 32, generator=gen, dtype=torch.float64)  # two projections share the input
    b1 = torch.randn(slots, 24, rank, generator=gen, dtype=torch.float64)
    b2 = torch.randn(slots, 40, rank, generator=gen, dtype=torch.float64)
    a[0], b1[0], b2[0] = 0, 0, 0
    x = torch.randn(rows, 32, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, slots, (rows,), generator=gen)
    idx[0], idx[1] = 0, 3  # at least one base row and one adapter row
    y1 = torch.randn(rows, 24, generator=gen, dtype=torch.float64)
    y2 = torch.randn(rows, 40, generator=gen, dtype=torch.float64)
    want1 = y1 + expand_reference(shrink_reference(x, a[:, :rank], idx), b1, idx)
    want2 = y2 + expand_reference(shrink_reference(x, a[:, rank:], idx), b2, idx)
    apply_lora(LoraBatch(idx), x, a, [(y1, b1), (y2, b2)], rank)
    assert _rel(y1, want1) < 1e-12 and _rel(y2, want2) < 1e-12
    assert torch.equal(y1[0], want1[0])  # the base row is untouched


def test_single_adapter_and_no_adapter_paths() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 16, generator=gen)
    b = torch.randn(3, 8, 4, generator=gen)
    x = torch.randn(5, 16, generator=gen)
    single = LoraBatch(torch.full((5,), 2))
    assert single.mode == "single"
    y = torch.zeros(5, 8)
    apply_lora(single, x, a, [(y, b)], 4)
    torch.testing.assert_close(y, x @ a[2].T @ b[2].T)
    none = LoraBatch(torch.zeros(5, dtype=torch.long))
    assert not none.active
    y = torch.ones(5, 8)
    apply_lora(none, x, a, [(y, b)], 4)
    assert torch.equal(y, torch.ones(5, 8))


def test_gather_cache_is_per_weight_tensor() -> None:
    """Two different weight views under one plan must not share a cached gather."""
    stack = torch.randn(2, 3, 4, 6)  # [layers, slots, r, in]
    batch = LoraBatch(torch.tensor([1, 2, 1]))
    x = torch.randn(3, 6)
    h0 = batch.shrink(x, stack[0])
    h1 = batch.shrink(x, stack[1])
    torch.testing.assert_close(h1, shrink_reference(x, stack[1], batch.idx))
    assert not torch.allclose(h0, h1)


def _weights(shapes: BaseShapes, rank: int, seed: int) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(shapes.num_layers):
        for proj, (fan_in, fan_out) in shapes.io.items():
            modules[(layer, proj)] = (
                torch.randn(rank, fan_in, generator=gen),
                torch.randn(fan_out, rank, generator=gen),
            )
    return LoraWeights(LoraAdapterConfig(r=rank, lora_alpha=rank), modules, rank)


SHAPES = BaseShapes(2, {"q_proj": (8, 8), "k_proj": (8, 4), "v_proj": (8, 4), "o_proj": (8, 8),
                        "gate_proj": (8, 12), "up_proj": (8, 12), "down_proj": (12, 8)})  # fmt: skip


def test_slot_bank_pads_lower_ranks_and_evicts_lru_only_when_unpinned() -> None:
    bank = LoraSlotBank(SHAPES, num_slots=2, max_rank=4)
    low = _weights(SHAPES, 2, seed=0)
    s1 = bank.acquire("low", low)
    a, b = low.modules[(1, "k_proj")]
    assert torch.equal(bank.a["qkv"][1, s1, 4:6], a)  # k's A sits after q's r=4 rows
    assert torch.equal(bank.a["qkv"][1, s1, 6:8], torch.zeros(2, 8))  # zero padding to the slot rank
    assert torch.equal(bank.b["k_proj"][1, s1, :, :2], b) and not bank.b["k_proj"][1, s1, :, 2:].any()
    bank.acquire("other", _weights(SHAPES, 4, seed=1))
    with pytest.raises(NoFreeSlot):
        bank.acquire("third", _weights(SHAPES, 4, seed=2))
    bank.release("low")  # now unpinned: the least recently used victim
    s3 = bank.acquire("third", _weights(SHAPES, 4, seed=2))
    assert s3 == s1 and bank.slot_of("low") is None and bank.evictions == 1
    assert bank.slot_of("other") is not None


@pytest.mark.parametrize("kernel", ["gather", "grouped"])
@pytest.mark.parametrize("idx", [[0, 3, 1, 3, 3, 0, 2], [3, 5, 3, 5, 5], [2, 2, 2, 2, 4], [4, 0], [0, 0, 5, 0, 1]])
def test_every_mixed_path_matches_the_reference_on_slot_bank_views(kernel: str, idx: list[int]) -> None:
    """The bank's layout (one slot-major storage, each matrix stored transposed) through both mixed paths, with
    and without the storage handle (the all-layer gather vs per-tensor gathers), against the float64 oracle."""
    bank = LoraSlotBank(SHAPES, num_slots=5, max_rank=4, dtype=torch.float64)
    for slot in range(1, 6):
        bank.acquire(f"a{slot}", _weights(SHAPES, 2 + slot % 3, seed=slot))
    gen = torch.Generator().manual_seed(len(idx))
    rows = torch.tensor(idx)
    for storage in (bank.storage, None):
        batch = LoraBatch(rows, storage, kernel=kernel)
        assert batch.mode == kernel
        for layer in range(SHAPES.num_layers):  # one plan across layers: cached gathers must not mix them up
            a = bank.a["gate_up"][layer]
            x = torch.randn(len(idx), 8, generator=gen, dtype=torch.float64)
            outs = [torch.randn(len(idx), 12, generator=gen, dtype=torch.float64) for _ in range(2)]
            want = [y + expand_reference(shrink_reference(x, a[:, i * 4 : (i + 1) * 4], rows), bank.b[p][layer], rows)
                    for i, (y, p) in enumerate(zip(outs, ("gate_proj", "up_proj"), strict=True))]  # fmt: skip
            apply_lora(batch, x, a, [(outs[0], bank.b["gate_proj"][layer]), (outs[1], bank.b["up_proj"][layer])], 4)
            for got, ref in zip(outs, want, strict=True):
                assert _rel(got, ref) < 1e-12
            h = batch.shrink(x, a)
            torch.testing.assert_close(h, shrink_reference(x, a, rows), rtol=1e-12, atol=1e-12)
            y = torch.zeros(len(idx), 12, dtype=torch.float64)
            torch.testing.assert_close(batch.expand_add(y, h[:, :4], bank.b["gate_proj"][layer]),
                                       expand_reference(h[:, :4], bank.b["gate_proj"][layer], rows))  # fmt: skip


def test_slot_bank_tensors_are_views_of_one_slot_major_storage() -> None:
    bank = LoraSlotBank(SHAPES, num_slots=2, max_rank=4)
    s = bank.acquire("x", _weights(SHAPES, 4, seed=3))
    row = bank.storage[s]
    assert bank.nbytes() == bank.storage.numel() * 4
    for tensor in [*bank.a.values(), *bank.b.values()]:
        assert tensor.untyped_storage().data_ptr() == bank.storage.untyped_storage().data_ptr()
        assert tensor.stride(1) == bank.storage.stride(0)
        assert tensor[0, s].T.is_contiguous()  # each matrix stored transposed: what the matmuls read
    assert float(row.abs().sum()) == pytest.approx(float(sum(t[:, s].abs().sum() for t in [*bank.a.values(),
                                                                                        *bank.b.values()])))  # fmt: skip
    assert not bank.storage[0].any()


def test_auto_picks_gather_for_small_adapters_and_grouped_for_big_ones(monkeypatch) -> None:
    from adapters import native_lora
    from adapters.lora_modes import GATHER_BUDGET_BYTES, choose_mode

    monkeypatch.setattr(native_lora, "available", lambda: False)  # the choice between the PyTorch paths
    big = GATHER_BUDGET_BYTES  # one adapter as big as the whole gather budget
    assert choose_mode(64, 64, 64, 64, None) == "gather"  # one row per adapter: the gather does less work
    assert choose_mode(64, 64, 64, 64, 1024) == "gather"
    assert choose_mode(64, 64, 64, 64, big) == "grouped"  # ... unless its per-row copies are too big
    assert choose_mode(64, 64, 32, 64, None) == "grouped"  # rows share adapters: read each adapter once
    assert choose_mode(64, 48, 8, 48, 1024) == "grouped"  # (16 base rows: not in the grouped block)
    assert choose_mode(64, 64, 32, 33 * 33, big) == "gather"  # so skewed that padding to the busiest one loses
    small = LoraSlotBank(SHAPES, num_slots=3, max_rank=4)
    assert LoraBatch(torch.tensor([1, 2, 3, 0]), small.storage).mode == "gather"
    assert LoraBatch(torch.tensor([1, 2, 1, 2, 0, 0, 0]), small.storage).mode == "grouped"
    assert LoraBatch(torch.tensor([2, 2]), small.storage).mode == "single"
    assert LoraBatch(torch.tensor([1, 2, 0]), small.storage, kernel="grouped").mode == "grouped"


def test_a_plan_takes_over_the_previous_gather_and_copies_only_changed_rows() -> None:
    bank = LoraSlotBank(SHAPES, num_slots=4, max_rank=4, dtype=torch.float64)
    for slot in range(1, 5):
        bank.acquire(f"a{slot}", _weights(SHAPES, 4, seed=slot))
    gen = torch.Generator().manual_seed(0)
    a, b = bank.a["qkv"][1], bank.b["v_proj"][1]
    plan, takeovers = None, 0
    # continuous batching: rows join at the end, a finished row is replaced by the last one, the batch shrinks
    for idx in ([1, 2], [1, 2, 3], [1, 2, 3, 4, 0], [1, 4, 3], [4, 4, 3, 1, 2, 2], [2, 1]):
        rows = torch.tensor(idx)
        previous = plan
        plan = LoraBatch(rows, bank.storage, kernel="gather", previous=previous)
        x = torch.randn(len(idx), 8, generator=gen, dtype=torch.float64)
        y = torch.zeros(len(idx), 4, dtype=torch.float64)
        apply_lora(plan, x, a, [(torch.zeros(len(idx), 8, dtype=torch.float64), bank.b["q_proj"][1]),
                                (torch.zeros(len(idx), 4, dtype=torch.float64), bank.b["k_proj"][1]), (y, b)], 4)  # fmt: skip
        want = expand_reference(shrink_reference(x, a[:, 8:12], rows), b, rows)
        assert _rel(y, want) < 1e-12
        if previous is not None and previous._rows_buffer is None:  # taken over: the old plan was released
            takeovers += 1
            assert plan._rows_buffer is not None
    assert takeovers == 4  # every step but the first and the one that outgrew the buffer (2 -> room 4 -> 5)
    reused = LoraBatch(torch.tensor([2, 1]), bank.storage, kernel="gather", previous=plan)
    x = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    y_old, y_new = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    reused.expand_add(y_new, x[:, :4], b)
    plan.expand_add(y_old, x[:, :4], b)  # a released plan still computes correctly (it gathers again)
    torch.testing.assert_close(y_old, y_new)
