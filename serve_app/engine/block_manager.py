"""Block manager for a paged KV cache: fixed-size blocks handed out from a free list, one block table per sequence,
and preemption when blocks run out (the engine's paged KV cache: serve_app/engine/paged_kv.py).

A sequence's token at position p lives in block `table[p // block_size]` at offset `p % block_size`; its physical
slot is `block * block_size + offset` (the index a paged KV tensor [num_blocks * block_size, ...] is written at).
When a sequence finishes its blocks go back to the free list and are reused as they are: no other sequence's
table or KV moves (no compaction copies). Blocks are reused last-freed first.

Preemption is by recomputation: `reserve_decode(order)` makes room for one more token for every sequence in
`order` (highest priority first); when the free list cannot cover them, sequences are preempted from the end of
`order` (their blocks freed, they re-enter the waiting queue and are prefilled again) until the rest fit.

    python -m serve_app.engine.block_manager      # a short demonstration: allocate, finish, reuse, preempt
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks for the request (the caller waits or preempts)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() takes block 0 first
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that `num_tokens` tokens occupy."""
        return -(-num_tokens // self.block_size)

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def length(self, seq_id: Hashable) -> int:
        """Tokens the sequence has slots for."""
        return self._lengths[seq_id]

    def table(self, seq_id: Hashable) -> list[int]:
        """The sequence's block table (a copy)."""
        return list(self._tables[seq_id])

    # -- allocation ------------------------------------------------------------------------------------------
    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Blocks for a new sequence's first `num_tokens` tokens (its prompt); returns its table."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        need = self.blocks_for(num_tokens)
        if need > len(self._free):
            raise OutOfBlocks(f"{need} blocks needed for {num_tokens} tokens, {len(self._free)} free")
        self._tables[seq_id] = [self._free.pop() for _ in range(need)]
        self._lengths[seq_id] = num_tokens
        return self.table(seq_id)

    def append_slot(self, seq_id: Hashable) -> int:
        """Room for one more token; returns its physical slot (a new block is taken when the last one is full)."""
        table, length = self._tables[seq_id], self._lengths[seq_id]
        if length == len(table) * self.block_size:
            if not self._free:
                raise OutOfBlocks(f"no free block for sequence {seq_id!r}")
            table.append(self._free.pop())
        self._lengths[seq_id] = length + 1
        return table[length // self.block_size] * self.block_size + length % self.block_size

    def free(self, seq_id: Hashable) -> int:
        """Return a finished (or preempted) sequence's blocks to the free list; returns how many."""
        table = self._tables.pop(seq_id)
        del self._lengths[seq_id]
        self._free.extend(reversed(table))
        return len(table)

    def reserve_decode(self, order: Sequence[Hashable]) -> list[Hashable]:
        """Make sure every sequence in `order` can append one token, preempting from the end of `order` if blocks
        run out. Returns the preempted ids (their blocks freed), lowest priority first."""
        running = list(order)
        preempted: list[Hashable] = []
        while running:
            need = sum(1 for s in running if self._lengths[s] == len(self._tables[s]) * self.block_size)
            if need <= len(self._free):
                break
            victim = running.pop()
            self.free(victim)
            preempted.append(victim)
        return preempted

    # -- addresses -------------------------------------------------------------------------------------------
    def slot(self, seq_id: Hashable, position: int) -> int:
        """Physical slot of the token at `position` of the sequence."""
        if not 0 <= position < self._lengths[seq_id]:
            raise IndexError(f"position {position} outside sequence {seq_id!r} of {self._lengths[seq_id]} tokens")
        return self._tables[seq_id][position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Physical slots of positions start..end-1 (a prefill chunk)."""
        return [self.slot(seq_id, p) for p in range(start, end)]

    def block_tables(self, seq_ids: Sequence[Hashable], device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """[B, max blocks] int32 block tables (padded with 0: never read past a row's length) and [B] int32
        lengths, the inputs of `paged_attention.paged_decode`."""
        width = max((len(self._tables[s]) for s in seq_ids), default=0)
        tables = torch.zeros(len(seq_ids), max(width, 1), dtype=torch.int32)
        for row, s in enumerate(seq_ids):
            tables[row, : len(self._tables[s])] = torch.tensor(self._tables[s], dtype=torch.int32)
        lengths = torch.tensor([self._lengths[s] for s in seq_ids], dtype=torch.int32)
        return tables.to(device), lengths.to(device)


if __name__ == "__main__":
    manager = BlockManager(num_blocks=6, block_size=4)
    print("a", manager.allocate("a", 7), "b", manager.allocate("b", 5), "free", manager.num_free)
    manager.free("a")
    print("a finished; c reuses its blocks:", manager.allocate("c", 8), "b unchanged:", manager.table("b"))
    for _ in range(7):
        manager.append_slot("b")
    print("b grew to", manager.length("b"), manager.table("b"), "free", manager.num_free)
    print("b and c both need a block for their next token, one is free: preempted", manager.reserve_decode(["b", "c"]))
