"""Next-token choice for a batch. Rows that need nothing per row (greedy, no penalties, no grammar) share one argmax;
the others are processed one by one: logit bias, repetition / presence / frequency penalties, the JSON grammar's
token mask (serve_app/engine/constraints.py), then greedy or temperature + top-k + top-p sampling with the
request's own seeded generator (so `seed` reproduces a completion whatever else is in the batch). Logprobs of the
chosen tokens are recorded from the raw logits (serve_app/engine/logprobs.py).
"""

from __future__ import annotations

import torch

from serve_app.engine import logprobs
from serve_app.engine.sequence import SamplingParams, Sequence

MIN_TEMPERATURE = 1e-4


def _process(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row's logits [V] (a copy) with bias, penalties and the grammar mask applied."""
    params = seq.params
    out = logits.clone()
    if params.logit_bias:
        ids = torch.tensor([i for i, _ in params.logit_bias if i < out.shape[0]], dtype=torch.long)
        bias = torch.tensor([b for i, b in params.logit_bias if i < out.shape[0]], dtype=out.dtype)
        out[ids.to(out.device)] += bias.to(out.device)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_ids) | set(seq.output_ids)), dtype=torch.long, device=out.device)
        picked = out[seen]
        out[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids, device=out.device), minlength=out.shape[0])
        counts = counts[: out.shape[0]].to(out.dtype)
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(out.dtype)
    if seq.constraint is not None:
        seq.constraint.mask(out)
    return out


def _draw(logits: torch.Tensor, seq: Sequence) -> int:
    """Sample one token from a row's (processed) logits with temperature, top-k and top-p."""
    params: SamplingParams = seq.params
    # a tiny temperature (1e-300 becomes 0.0 in fp32) would give inf/NaN probabilities: floor it
    probs = torch.softmax(logits / max(params.temperature, MIN_TEMPERATURE), dim=-1)
    if not bool(torch.isfinite(probs).all()):
        return int(logits.argmax())  # NaN logits (e.g. an adapter with huge weights): argmax, not a failed batch
    if params.top_k and params.top_k < probs.shape[0]:
        kth = probs.topk(params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p
        keep[0] = True  # the top token, even for a top_p that is 0.0 in fp32 (5e-324 was a 500)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    if seq.generator is None:
        seq.generator = torch.Generator(device="cpu")
        seq.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    return int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [B, V] (any float dtype) -> one token id per row; advances each row's grammar by its token."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        params = seq.params
        if params.temperature <= 0 and not params.needs_processing:
            continue
        row_logits = _process(logits[row], seq) if params.needs_processing else logits[row]
        chosen[row] = int(row_logits.argmax()) if params.temperature <= 0 else _draw(row_logits, seq)
        if seq.constraint is not None and not seq.constraint.done:
            seq.constraint.accept(chosen[row])
    logprobs.note_chosen(logits, [r for r, s in enumerate(seqs) if s.params.logprobs is not None], seqs, chosen)
    return chosen
