"""Log-probabilities as the engine reports them: the model's own next-token distribution, `log_softmax` of the raw
logits (before temperature, top-k/p, penalties, logit bias and the JSON grammar mask, as vLLM's default
`raw_logprobs`), for the tokens it chose (`note_chosen`) and, when asked, for the prompt's tokens (`note_prompt`,
from the prefill's logits). Used by serve_app/engine/sampler.py and engine.py; checked against a plain forward
pass in tests/test_api_logprobs.py.
"""

from __future__ import annotations

import torch

from serve_app.engine.sequence import Sequence, TopLogprobs


def top(logp: torch.Tensor, k: int) -> TopLogprobs:
    """The k most likely tokens of one row of logprobs, most likely first."""
    if k <= 0:
        return []
    values, ids = logp.topk(min(k, logp.shape[-1]))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def note_chosen(logits: torch.Tensor, rows: list[int], seqs: list[Sequence], chosen: list[int]) -> None:
    """Record on each sequence that asked (params.logprobs is not None) its chosen token's logprob and top-k."""
    if not rows:
        return
    logp = torch.log_softmax(logits[rows].float(), dim=-1)
    for i, row in enumerate(rows):
        seq = seqs[row]
        seq.last_logprob = float(logp[i, chosen[row]])
        seq.last_top = top(logp[i], seq.params.logprobs or 0)


def note_prompt(seq: Sequence, logits: torch.Tensor, start: int) -> torch.Tensor:
    """`logits` [C, V] of prompt positions start..start+C-1: record the logprob (and top-k) of each next prompt
    token on `seq.prompt_logprobs` (the first prompt token has none); return the last row's logits."""
    if seq.prompt_logprobs is None:
        seq.prompt_logprobs = [(None, [])]
    k = seq.params.prompt_logprobs or 0
    end = min(start + logits.shape[0], len(seq.prompt_ids) - 1)  # positions whose next token is in the prompt
    if end > start:
        logp = torch.log_softmax(logits[: end - start].float(), dim=-1)
        targets = torch.tensor(seq.prompt_ids[start + 1 : end + 1], device=logp.device)
        picked = logp.gather(1, targets[:, None])[:, 0].tolist()
        seq.prompt_logprobs += [(value, top(logp[i], k)) for i, value in enumerate(picked)]
    return logits[-1]
