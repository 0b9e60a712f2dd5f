"""Which path a batched-LoRA plan (`adapters.batched_lora.LoraBatch`) takes: the `gather` / `grouped` choice for a
mixed batch on PyTorch, and whether the native C kernel (CPU float32) or the Triton kernels (CUDA) can run. Pure
decisions, no tensors touched; `tests/test_batched_lora.py` checks `choose_mode`.
"""

from __future__ import annotations

from typing import Literal

import torch

from adapters import native_lora, triton_runtime

Mode = Literal["none", "single", "gather", "grouped", "native", "triton"]
Kernel = Literal["auto", "native", "gather", "grouped", "triton"]
# `auto` groups when rows share adapters (at least this many adapter rows per distinct adapter) ...
GROUP_WHEN_ROWS_PER_ADAPTER = 1.5
# ... or when the per-row weight copies of a gather would exceed this size,
GATHER_BUDGET_BYTES = 64 * 2**20
# ... but only while padding every adapter to the busiest one's row count is at most this many rows per adapter
# row (beyond that the grouped bmm mostly multiplies zeros).
MAX_GROUPED_PADDING = 4.0


def choose_mode(rows: int, adapter_rows: int, distinct: int, grouped_rows: int, slot_bytes: int | None) -> Mode:
    """`gather` or `grouped` for a mixed batch: `rows` rows, `adapter_rows` of them on one of `distinct` adapters,
    which `grouped` pads to `grouped_rows`; `slot_bytes` is one adapter's size in every layer (None: unknown)."""
    if grouped_rows > MAX_GROUPED_PADDING * adapter_rows:
        return "gather"
    shared = adapter_rows >= GROUP_WHEN_ROWS_PER_ADAPTER * distinct
    too_big = slot_bytes is not None and rows * slot_bytes > GATHER_BUDGET_BYTES
    return "grouped" if shared or too_big else "gather"


def slot_count(storage: torch.Tensor | None) -> int | None:
    """The slot bank's slot count (slot 0 included), which the native plans check their slots against."""
    return None if storage is None else int(storage.shape[0])


def native_runs(kernel: str, idx: torch.Tensor, storage: torch.Tensor | None) -> bool:
    """`native` asked for (or `auto` over a float32 slot bank), on CPU, and the kernel built."""
    if kernel not in ("auto", "native") or idx.device.type != "cpu":
        return False
    if storage is None:
        return kernel == "native" and native_lora.available()
    return storage.dtype == torch.float32 and storage.device.type == "cpu" and native_lora.available()


def triton_runs(kernel: str, idx: torch.Tensor, mode: str = "") -> bool:
    """`triton` asked for (raises if the kernels cannot run on idx's device), or `auto` on CUDA with triton for
    a mixed batch (rows all on one adapter keep `single`: two plain GEMMs beat a one-segment SGMV)."""
    if kernel == "triton":
        triton_runtime.require(idx.device)
        return True
    return kernel == "auto" and mode != "single" and triton_runtime.auto_picks(idx.device)
