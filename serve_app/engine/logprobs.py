"""Log-probabilities as the engine reports them: the model's own next-token distribution, `log_softmax` of the raw
logits (before temperature, top-k/p, penalties, logit bias and the JSON grammar mask, as vLLM's default
`raw_logprobs`), for the tokens it chose (`note_chosen`) and, when asked, for the prompt's tokens (`note_prompt`,
from the prefill's logits). Used by serve_app/engine/sampler.py and engine.py; checked against a plain forward
pass in tests/test_api_logprobs.py.
"""

from __future__ import annotations

from typing import Any

import torch

from serve_app.engine.sequence import Sequence, TopLogprobs


def top(logp: torch.Tensor, k: int) -> TopLogprobs:
    """The k most likely tokens of one row of logprobs, most likely first."""
    if k <= 0:
        return []
    values, ids = logp.topk(min(k, logp.shape[-1]))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def on_device(logits: torch.Tensor, rows: list[int], chosen: torch.Tensor, k: int) -> list[torch.Tensor]:
    """For rows `rows` of `logits` [N, V]: the chosen tokens' logprobs [n] and the top-k logprobs and ids [n, k],
    still on the device (the sampler moves them to the host with everything else in one sync)."""
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    picked = logp.gather(1, chosen.index_select(0, index)[:, None])[:, 0]
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [picked, values, ids]


def note_chosen(flat: list[float], rows: list[int], seqs: list[Any], width: int) -> None:
    """Record on each sequence of `rows` its chosen token's logprob and top-k, from the host copy of `on_device`'s
    tensors concatenated (`flat`; `width`: the top-k computed, min(k, vocabulary))."""
    n = len(rows)
    picked, values, ids = flat[:n], flat[n : n + n * width], flat[n + n * width : n + 2 * n * width]
    for i, row in enumerate(rows):
        seq = seqs[row]
        want = min(seq.params.logprobs or 0, width)
        seq.last_logprob = float(picked[i])
        seq.last_top = [(int(ids[i * width + j]), float(values[i * width + j])) for j in range(want)]


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
