"""The engine's paged KV cache: K and V as [num_layers][num_blocks, block_size, kv_heads, head_dim] tensors, handed
out block by block by a `BlockManager` (one block table per running sequence; serve_app/engine/block_manager.py).

A sequence's blocks are taken when it is admitted (its whole prompt, or prompt + output so far when it resumes
after a preemption) and one more at a block boundary as it decodes; when it finishes they go back to the free list
as they are: no other sequence's K/V moves (no compaction copies). `reserve` runs before each decode step: when the
free blocks cannot cover every decode row's next token it preempts the youngest running sequences (their blocks are
freed, the engine puts them back in the waiting queue and recomputes their K/V by prefilling them again).

    python -m serve_app.engine.paged_kv        # allocate, grow, preempt, free: prints the free-block count
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from serve_app.engine.block_manager import BlockManager


class PagedKV:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str,
                 scratch: bool = False) -> None:  # fmt: skip
        """`scratch`: one more block past the managed ones (`scratch_block`), never handed out: the padded rows of a
        static decode batch (serve_app/engine/decode_graphs.py) write and read there, never into a live block."""
        shape = (num_layers, num_blocks + int(scratch), block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.block_size = block_size
        self.max_len = max_len  # one sequence's limit (prompt + output)
        self.scratch_block: int | None = num_blocks if scratch else None

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V as [num_blocks * block_size, kv_heads, head_dim] views (index = physical slot)."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def can_hold(self, num_tokens: int) -> bool:
        return self.blocks.can_allocate(num_tokens)

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        return self.blocks.allocate(seq_id, num_tokens)

    def table(self, seq_id: Hashable) -> list[int]:
        return self.blocks.table(seq_id)

    def append(self, seq_id: Hashable) -> int:
        """Room for the sequence's next token (a decode step); returns its physical slot."""
        return self.blocks.append_slot(seq_id)

    def free(self, seq_id: Hashable) -> None:
        if self.blocks.has(seq_id):
            self.blocks.free(seq_id)

    def zero(self, seq_id: Hashable) -> None:
        """Zero a sequence's blocks in every layer (non-finite K/V from an overflowing adapter: not left behind)."""
        if self.blocks.has(seq_id):
            index = torch.tensor(self.blocks.table(seq_id), device=self.k.device)
            self.k.index_fill_(1, index, 0)
            self.v.index_fill_(1, index, 0)

    def reserve(self, decoding: Sequence[Hashable], running: Sequence[Hashable]) -> list[Hashable]:
        """Make room for one more token of every sequence in `decoding`; when blocks run out free the youngest
        sequences of `running` (oldest first; holding blocks) until the rest fit. Returns the preempted ids."""
        blocks = self.blocks
        decode = list(decoding)
        candidates = [s for s in running if blocks.has(s)]
        preempted: list[Hashable] = []
        while True:
            need = sum(1 for s in decode if blocks.length(s) == len(blocks.table(s)) * blocks.block_size)
            if need <= blocks.num_free or not candidates:
                return preempted
            victim = candidates.pop()
            blocks.free(victim)
            preempted.append(victim)
            if victim in decode:
                decode.remove(victim)

    @property
    def num_free(self) -> int:
        return self.blocks.num_free

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


if __name__ == "__main__":
    kv = PagedKV(num_layers=2, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=8, max_len=64,
                 dtype=torch.float32, device="cpu")  # fmt: skip
    kv.allocate("old", 32)
    kv.allocate("young", 32)
    print("two full sequences, free:", kv.num_free, "preempted:", kv.reserve(["old", "young"], ["old", "young"]))
    kv.append("old")
    kv.free("old")
    print("after the old one finished, free:", kv.num_free)
