"""K preallocated adapter slots per layer, the memory the batched-LoRA operator reads from.

Layout (L layers, S = K + 1 slots, slot 0 all zeros = "no adapter", r = the engine's max LoRA rank):
    a["qkv"]     [L, S, 3r, hidden]    A of q/k/v stacked: one shrink serves all three projections
    a["o"]       [L, S, r, q_out]
    a["gate_up"] [L, S, 2r, hidden]
    a["down"]    [L, S, r, intermediate]
    b[proj]      [L, S, out, r]        one per projection, LoRA scale folded in
Lower-rank adapters are zero-padded to r. All of it lives in one slot-major buffer, `storage` [S, F] (F = one
adapter's floats, every layer): each `a`/`b` tensor above is a view of it, and each slot's matrix is stored
transposed (A.T [in, 3r], B.T [r, out] contiguous), the layout the operator's matmuls read without a copy. So one
`storage.index_select(0, rows)` gathers every layer's weights for a batch's rows at once (see `batched_lora`).
An adapter is *pinned* while running sequences use it; only unpinned slots are evicted (least recently used
first). Loading copies host tensors into the slot; on CUDA the host copy is pinned and the copy is non-blocking on
a side stream, so it overlaps the running decode.

    python -m adapters.slot_bank      # prints the slot memory for SmolLM2 at a few (K, r)
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from adapters.lora_files import BaseShapes, LoraWeights

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class NoFreeSlot(RuntimeError):
    """Every slot holds an adapter that running sequences still use."""


class LoraSlotBank:
    def __init__(
        self,
        shapes: BaseShapes,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be >= 1")
        self.shapes = shapes
        self.num_slots = num_slots
        self.rank = max_rank
        self.dtype = dtype
        self.device = torch.device(device)
        layers, slots = shapes.num_layers, num_slots + 1
        # (logical shape [rows, cols] of one layer's matrix) per tensor; stored transposed, layer-major, per slot
        blocks = {("a", g): (max_rank * len(projs), shapes.io[projs[0]][0]) for g, projs in GROUPS.items()}
        blocks |= {("b", p): (shapes.io[p][1], max_rank) for projs in GROUPS.values() for p in projs}
        per_slot = sum(layers * rows * cols for rows, cols in blocks.values())
        self.storage = torch.zeros(slots, per_slot, dtype=dtype, device=device)
        views: dict[tuple[str, str], torch.Tensor] = {}
        offset = 0
        for key, (rows, cols) in blocks.items():
            size = layers * rows * cols
            block = self.storage[:, offset : offset + size].view(slots, layers, cols, rows)  # [S, L, cols, rows]
            views[key] = block.permute(1, 0, 3, 2)  # [L, S, rows, cols], each matrix transposed in memory
            offset += size
        self.a = {g: views[("a", g)] for g in GROUPS}
        self.b = {p: views[("b", p)] for projs in GROUPS.values() for p in projs}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self._free = list(range(num_slots, 0, -1))
        self._pins: dict[str, int] = {}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.loads = 0
        self.evictions = 0

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def slot_of(self, adapter_id: str) -> int | None:
        return self._slot_of.get(adapter_id)

    def resident(self) -> list[str]:
        return list(self._slot_of)

    def pinned(self, adapter_id: str) -> int:
        return self._pins.get(adapter_id, 0)

    def can_place(self, adapter_id: str) -> bool:
        """True if the adapter is resident, a slot is free, or an unpinned adapter can be evicted."""
        return adapter_id in self._slot_of or bool(self._free) or any(not self._pins.get(a) for a in self._slot_of)

    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    # -- the operations the scheduler uses ---------------------------------------------------------------------
    def acquire(self, adapter_id: str, weights: LoraWeights | None = None) -> int:
        """Pin `adapter_id` into a slot (loading `weights` if it is not resident) and return the slot."""
        slot = self._slot_of.get(adapter_id)
        if slot is None:
            if weights is None:
                raise KeyError(f"adapter {adapter_id} is not resident and no weights were given")
            slot = self._take_slot()
            self._write(slot, weights)
            self._slot_of[adapter_id] = slot
            self.loads += 1
        self._slot_of.move_to_end(adapter_id)
        self._pins[adapter_id] = self._pins.get(adapter_id, 0) + 1
        return slot

    def release(self, adapter_id: str) -> None:
        """Unpin once (a sequence using the adapter finished). The weights stay resident until evicted."""
        count = self._pins.get(adapter_id, 0)
        if count <= 1:
            self._pins.pop(adapter_id, None)
        else:
            self._pins[adapter_id] = count - 1

    def evict(self, adapter_id: str) -> bool:
        """Drop an unpinned adapter now (e.g. its registry entry was removed). False if pinned or absent."""
        if adapter_id not in self._slot_of or self._pins.get(adapter_id):
            return False
        slot = self._slot_of.pop(adapter_id)
        self._free.append(slot)
        self.evictions += 1
        return True

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for victim in self._slot_of:  # least recently used first
            if not self._pins.get(victim):
                self.evict(victim)
                return self._free.pop()
        raise NoFreeSlot(f"all {self.num_slots} adapter slots are in use by running sequences")

    def _write(self, slot: int, weights: LoraWeights) -> None:
        if weights.rank > self.rank:
            raise ValueError(f"adapter rank {weights.rank} exceeds slot rank {self.rank}")
        r = self.rank
        context = torch.cuda.stream(self._stream) if self._stream is not None else _nullcontext()
        with context:
            self.storage[slot].zero_()
            for (layer, proj), (a, b) in weights.modules.items():
                group = next(g for g, projs in GROUPS.items() if proj in projs)
                offset = GROUPS[group].index(proj) * r
                rank = a.shape[0]
                self.a[group][layer, slot, offset : offset + rank].copy_(_host(a, self.device), non_blocking=True)
                self.b[proj][layer, slot, :, :rank].copy_(_host(b, self.device), non_blocking=True)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)


def _host(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.pin_memory() if device.type == "cuda" and not t.is_pinned() else t


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    from types import SimpleNamespace

    smol = SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                           intermediate_size=1536, num_hidden_layers=30)  # fmt: skip
    shapes = BaseShapes.from_config(smol)
    for k, r in [(8, 16), (32, 16), (32, 64)]:
        bank = LoraSlotBank(shapes, k, r)
        print(f"SmolLM2 K={k:3d} r={r:3d}: {bank.nbytes() / 2**20:8.1f} MiB (float32)")
