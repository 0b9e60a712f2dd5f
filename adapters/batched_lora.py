"""The batched-LoRA operator: one forward for a batch whose rows use different adapters.

Adapter weights sit in stacked slot tensors (see `slot_bank`): A as [S, R, in] and B as [S, out, r], slot 0 all
zeros (rows without an adapter). Each row carries a slot index. The operator is the punica/S-LoRA pair:

    shrink:  h[n]  = x[n] @ A[idx[n]].T          (N, in)  -> (N, R)
    expand:  y[n] += h[n] @ B[idx[n]].T          (N, r)   -> (N, out)   (the LoRA scale is folded into B)

`LoraBatch` is the plan for one step's rows. It picks the cheapest correct path:
  - `single`: every row uses the same slot (a prefill chunk, or a batch of one adapter): two plain matmuls;
  - `none`:   no row uses an adapter: nothing to do;
  - `gather`: the reference path: gather each row's A/B (`index_select`) and `torch.bmm`. The gathered copies
    are cached on the plan, so consecutive decode steps over the same rows (continuous batching changes the
    batch only when a request joins or leaves) pay for the gather once.
`shrink_reference` / `expand_reference` are the float64-checkable oracle for any faster kernel.

    python -m adapters.batched_lora        # self-check: every path against the per-row reference
"""

from __future__ import annotations

from typing import Any

import torch


def shrink_reference(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row by row: h[n] = x[n] @ a[idx[n]].T — the oracle, slow, obviously right."""
    return torch.stack([x[n] @ a[int(idx[n])].T for n in range(x.shape[0])]) if x.shape[0] else x.new_zeros(0, a.shape[1])


def expand_reference(h: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row by row: delta[n] = h[n] @ b[idx[n]].T."""
    return torch.stack([h[n] @ b[int(idx[n])].T for n in range(h.shape[0])]) if h.shape[0] else h.new_zeros(0, b.shape[1])


class LoraBatch:
    """The per-row slot indices of one forward, and how to apply LoRA to them.

    `idx` holds one slot per row (0 = no adapter). Build one per composition of rows and reuse it while the rows
    do not change; gathered weights are cached per weight tensor.
    """

    def __init__(self, idx: torch.Tensor, cache_gathers: bool = True) -> None:
        self.idx = idx
        self.rows = int(idx.shape[0])
        slots = torch.unique(idx)
        self.distinct = [int(s) for s in slots if int(s) != 0]
        if not self.distinct:
            self.mode = "none"
        elif len(slots) == 1:
            self.mode = "single"
            self.slot = self.distinct[0]
        else:
            self.mode = "gather"
        self._cache_gathers = cache_gathers
        self._gathered: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def _rows_of(self, weights: torch.Tensor) -> torch.Tensor:
        key = (weights.data_ptr(), tuple(weights.shape))  # stable for a view of a slot tensor (id() is not)
        hit = self._gathered.get(key)
        if hit is not None:
            return hit
        gathered = weights.index_select(0, self.idx)
        if self._cache_gathers:
            self._gathered[key] = gathered
        return gathered

    def shrink(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x [N, in], a [S, R, in] -> h [N, R]."""
        if self.mode == "single":
            return x @ a[self.slot].T
        return torch.bmm(x.unsqueeze(1), self._rows_of(a).transpose(1, 2)).squeeze(1)

    def expand_add(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y [N, out] += h [N, r] @ b[idx].T; returns y."""
        if self.mode == "single":
            return y.addmm_(h, b[self.slot].T)
        return y.add_(torch.bmm(h.unsqueeze(1), self._rows_of(b).transpose(1, 2)).squeeze(1))

    def release(self) -> None:
        self._gathered.clear()


def apply_lora(
    batch: LoraBatch | None,
    x: torch.Tensor,
    a: torch.Tensor,
    outputs: list[tuple[torch.Tensor, torch.Tensor]],
    rank: int,
) -> None:
    """Shrink once for every projection that shares input `x`, then expand into each output in place.

    `a` stacks the projections' A matrices along R (R = rank * len(outputs)); `outputs` pairs each projection's
    output [N, out] with its B slot tensor [S, out, rank].
    """
    if batch is None or not batch.active:
        return
    h = batch.shrink(x, a)
    for i, (y, b) in enumerate(outputs):
        batch.expand_add(y, h[:, i * rank : (i + 1) * rank], b)


def _self_check(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    slots, rank, fan_in, fan_out, rows = 5, 8, 48, 40, 11
    a = torch.randn(slots, rank, fan_in, generator=gen, dtype=torch.float64)
    b = torch.randn(slots, fan_out, rank, generator=gen, dtype=torch.float64)
    a[0].zero_()
    b[0].zero_()
    x = torch.randn(rows, fan_in, generator=gen, dtype=torch.float64)
    errors = {}
    for name, idx in {
        "mixed": torch.randint(0, slots, (rows,), generator=gen),
        "single": torch.full((rows,), 3),
        "none": torch.zeros(rows, dtype=torch.long),
    }.items():
        want = expand_reference(shrink_reference(x, a, idx), b, idx)
        batch = LoraBatch(idx)
        got = torch.zeros(rows, fan_out, dtype=torch.float64)
        apply_lora(batch, x, a, [(got, b)], rank)
        errors[name] = float((got - want).norm() / max(want.norm(), 1e-30))
    return errors


if __name__ == "__main__":
    for case, err in _self_check().items():
        print(f"{case:7s} relative error {err:.2e}")
