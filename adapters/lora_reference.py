"""The batched-LoRA operator's oracle: row by row, slow, obviously right (a leaf module: imports only torch).

Every path of the operator (`batched_lora.LoraBatch`: gather, grouped, single, the native C kernel in
`native_lora`, the side thread in `lora_side_thread`) is checked against these two functions, usually in float64.

    shrink:  h[n]     = x[n] @ a[idx[n]].T          a [S, R, in]  -> h [N, R]
    expand:  delta[n] = h[n] @ b[idx[n]].T          b [S, out, r] -> delta [N, out]

    python -c "import adapters.lora_reference"   # nothing to run: imported by the self-checks and tests
"""

from __future__ import annotations

import torch


def shrink_reference(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row by row: h[n] = x[n] @ a[idx[n]].T — the oracle, slow, obviously right."""
    return (
        torch.stack([x[n] @ a[int(idx[n])].T for n in range(x.shape[0])]) if x.shape[0] else x.new_zeros(0, a.shape[1])
    )


def expand_reference(h: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row by row: delta[n] = h[n] @ b[idx[n]].T."""
    return (
        torch.stack([h[n] @ b[int(idx[n])].T for n in range(h.shape[0])]) if h.shape[0] else h.new_zeros(0, b.shape[1])
    )
