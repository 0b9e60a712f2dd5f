"""Next-token choice for a batch: greedy rows in one argmax, sampled rows with temperature / top-p and each
request's own seeded generator (so `seed` reproduces a completion whatever else is in the batch)."""

from __future__ import annotations

import torch

from serve_app.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [B, V] (any float dtype) -> one token id per row."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        params = seq.params
        if params.temperature <= 0:
            continue
        probs = torch.softmax(logits[row] / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        if seq.generator is None:
            seq.generator = torch.Generator(device="cpu")
            seq.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        chosen[row] = int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))
    return chosen
