"""Next-token choice for a batch: greedy rows in one argmax, sampled rows with temperature / top-p and each
request's own seeded generator (so `seed` reproduces a completion whatever else is in the batch)."""

from __future__ import annotations

import torch

from serve_app.engine.sequence import Sequence

MIN_TEMPERATURE = 1e-4


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [B, V] (any float dtype) -> one token id per row."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        params = seq.params
        if params.temperature <= 0:
            continue
        # a tiny temperature (1e-300 becomes 0.0 in fp32) would give inf/NaN probabilities: floor it
        probs = torch.softmax(logits[row] / max(params.temperature, MIN_TEMPERATURE), dim=-1)
        if not bool(torch.isfinite(probs).all()):
            continue  # NaN logits (e.g. an adapter with huge weights): keep argmax rather than fail the whole batch
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p
            keep[0] = True  # the top token, even for a top_p that is 0.0 in fp32 (5e-324 was a 500)
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        if seq.generator is None:
            seq.generator = torch.Generator(device="cpu")
            seq.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        chosen[row] = int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))
    return chosen
