"""Fractional GPUs: a worker that Ray gave `gpus_per_worker < 1` of a card caps its CUDA memory to that share, so
four 0.25-GPU QLoRA runs packed on one A100 cannot starve each other (the one that overruns gets a CUDA
out-of-memory error of its own instead of taking a neighbour down).

Selected at run time: nothing happens on CPU or for whole GPUs. Not a script; used by jobs/ray_train.py and
jobs/ray_cotrain.py.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

HEADROOM = 0.02  # of the card, left outside every share: the CUDA context and allocator slack of each process


def memory_fraction(gpus_per_worker: float) -> float | None:
    """The fraction of its GPU's memory one worker may allocate; None = no cap (a whole GPU or more, or none)."""
    if gpus_per_worker <= 0 or gpus_per_worker >= 1:
        return None
    return max(gpus_per_worker - HEADROOM, 0.01)


def cap_memory(gpus_per_worker: float, device: str) -> float | None:
    """Apply `memory_fraction` to this process's CUDA device; returns the fraction set (None: none set)."""
    fraction = memory_fraction(gpus_per_worker)
    if fraction is None or not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    total = torch.cuda.get_device_properties(index).total_memory / 2**30
    log.info("GPU share %.2f: CUDA memory capped at %.0f%% of %.0f GiB", gpus_per_worker, 100 * fraction, total)
    print(f"GPU share {gpus_per_worker:g}: CUDA memory capped at {fraction * total:.1f} of {total:.0f} GiB", flush=True)
    return fraction


def release_cached_memory(device: str) -> None:
    """Give the allocator's cached blocks back to the card (after an eval engine is dropped), so a neighbour
    sharing the GPU can use them."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
