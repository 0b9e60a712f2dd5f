"""One step's batched prefill: prompt chunks of several sequences (varlen) in one forward.

`plan_prefill` takes the sequences still in prefill, oldest first, and gives each a chunk of at most `chunk` tokens
while the step's `budget` lasts (a long prompt takes several steps and never stalls the running decodes). The
chunks are concatenated into one token tensor with per-token positions and adapter slots (the batched-LoRA operator
takes one slot per token, so chunks of different adapters share the forward), plus the attention plan that writes
each chunk into its sequence's KV blocks and keeps every chunk to its own sequence (serve_app/engine/attention.py).
Logits are computed only where needed: the last token of each chunk, or every token of a chunk whose request asked
for prompt logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.engine.attention import PrefillAttention
from serve_app.engine.paged_kv import PagedKV
from serve_app.engine.sequence import Sequence


@dataclass
class Chunk:
    seq: Sequence
    start: int
    count: int
    want_all: bool  # every position's logits (prompt logprobs)
    first_row: int  # the chunk's first row in the prefill's logits

    @property
    def ends_prefill(self) -> bool:
        return self.start + self.count >= self.seq.prefill_target

    @property
    def last_row(self) -> int:
        """The chunk's last token's row in the prefill's logits."""
        return self.first_row + (self.count - 1 if self.want_all else 0)


@dataclass
class PrefillPlan:
    chunks: list[Chunk]
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: tuple[int, ...]  # adapter slot of each token
    attention: PrefillAttention
    logit_rows: torch.Tensor | None  # token indices whose logits are computed (None: all)


def plan_prefill(prefilling: list[Sequence], budget: int, chunk: int, kv: PagedKV,
                 device: torch.device) -> PrefillPlan | None:  # fmt: skip
    """The chunks of this step (None if nothing to prefill). Every sequence in `prefilling` holds KV blocks for
    its whole `prefill_target`."""
    chunks: list[Chunk] = []
    tokens: list[int] = []
    slots: list[int] = []
    rows: list[int] = []
    for seq in prefilling:
        if budget <= 0:
            break
        count = min(chunk, budget, seq.prefill_target - seq.prefilled)
        if count <= 0:
            continue
        want_all = seq.params.prompt_logprobs is not None and not seq.output_ids
        chunks.append(Chunk(seq, seq.prefilled, count, want_all, len(rows)))
        first = len(tokens)
        rows += list(range(first, first + count)) if want_all else [first + count - 1]
        tokens += seq.token_ids(seq.prefilled, seq.prefilled + count)
        slots += [seq.lora_slot] * count
        budget -= count
    if not chunks:
        return None
    positions = torch.cat([torch.arange(c.start, c.start + c.count) for c in chunks]).to(device)
    attention = PrefillAttention.build(kv, [(kv.table(c.seq.request_id), c.start, c.count) for c in chunks], device)
    logit_rows = None if len(rows) == len(tokens) else torch.tensor(rows, device=device)
    return PrefillPlan(chunks, torch.tensor(tokens, device=device), positions, tuple(slots), attention, logit_rows)
