"""Next-token choice for every row of a step, on the logits' device, with one host sync per step.

Rows that need nothing per row (greedy, no penalties, no grammar) share one argmax. The others are processed one by
one, still on the device: logit bias, repetition / presence / frequency penalties, the JSON grammar's token mask
(serve_app/engine/constraints.py), then greedy, or temperature + top-k + top-p sampling by an exponential race
(argmax of p / E with E ~ Exp(1) drawn by the request's own seeded generator on the device: a draw from p, so `seed`
reproduces a completion whatever else is in the batch). Logprobs of the chosen tokens are computed from the raw
logits (serve_app/engine/logprobs.py). Chosen ids, a finite flag per row and the logprobs travel to the host in one
tensor: `.tolist()` once per step. Rows given as None are only checked for finite logits (a prefill chunk that does
not end its prompt).
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


def _draw(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Sample one token (a 0-d tensor on the logits' device) from a row's processed logits with temperature,
    top-k and top-p; no host sync."""
    params: SamplingParams = seq.params
    # a tiny temperature (1e-300 becomes 0.0 in fp32) would give inf/NaN probabilities: floor it
    probs = torch.softmax(logits / max(params.temperature, MIN_TEMPERATURE), dim=-1)
    broken = ~torch.isfinite(probs).all()  # NaN logits (e.g. an adapter with huge weights): argmax, not a failure
    if params.top_k and params.top_k < probs.shape[0]:
        kth = probs.topk(params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p
        keep[0] = True  # the top token, even for a top_p that is 0.0 in fp32 (5e-324 was a 500)
        probs = torch.zeros_like(probs).scatter_(0, order, torch.where(keep, sorted_probs, 0.0))
    if seq.generator is None or seq.generator.device != probs.device:
        seq.generator = torch.Generator(device=probs.device)
        seq.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    race = torch.empty_like(probs).exponential_(generator=seq.generator)
    return torch.where(broken, logits.argmax(), (probs / race).argmax())


def sample(logits: torch.Tensor, seqs: list[Sequence | None]) -> tuple[list[int], list[bool]]:
    """logits [N, V] (any float dtype) -> (one token id per row, whether the row's logits are all finite). Rows
    whose sequence is None are not sampled (their id is the argmax, unused). Advances each sampled row's grammar by
    its token and records its logprobs when asked. One host sync."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1)
    finite = torch.isfinite(logits).all(dim=-1)
    picked_rows, picked = [], []
    for row, seq in enumerate(seqs):
        if seq is None or (seq.params.temperature <= 0 and not seq.params.needs_processing):
            continue
        row_logits = _process(logits[row], seq) if seq.params.needs_processing else logits[row]
        picked_rows.append(row)
        picked.append(row_logits.argmax() if seq.params.temperature <= 0 else _draw(row_logits, seq))
    if picked:
        chosen = chosen.index_put((torch.tensor(picked_rows, device=chosen.device),), torch.stack(picked))
    asked = [r for r, s in enumerate(seqs) if s is not None and s.params.logprobs is not None]
    top_k = min(logits.shape[-1], max((seqs[r].params.logprobs or 0 for r in asked), default=0))  # type: ignore[union-attr]
    parts = [chosen.double(), finite.double()]
    if asked:
        parts += [t.double().flatten() for t in logprobs.on_device(logits, asked, chosen, top_k)]
    values = torch.cat(parts).tolist()  # the step's one host sync
    rows = len(seqs)
    tokens = [int(t) for t in values[:rows]]
    ok = [bool(f) for f in values[rows : 2 * rows]]
    if asked:
        logprobs.note_chosen(values[2 * rows :], asked, seqs, top_k)
    for seq, token in zip(seqs, tokens, strict=True):
        if seq is not None and seq.constraint is not None and not seq.constraint.done:
            seq.constraint.accept(token)
    return tokens, ok
