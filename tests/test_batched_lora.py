"""The batched-LoRA operator against a float64 per-row reference, and the slot bank it reads from."""

from __future__ import annotations

import pytest
import torch

from adapters.batched_lora import LoraBatch, apply_lora, expand_reference, shrink_reference
from adapters.lora_files import BaseShapes, LoraAdapterConfig, LoraWeights
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
            modules[(layer, proj)] = (torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen))
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

