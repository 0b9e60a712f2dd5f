"""Whether the Triton batched-LoRA kernels (`adapters.triton_lora`) can run here, and why not (a leaf module: it
imports `triton` only when asked, so nothing pays for it on machines that never use it).

The kernels run on CUDA tensors, or on CPU tensors when the process started under the Triton interpreter
(`TRITON_INTERPRET=1` must be in the environment before `adapters.triton_lora` is first imported: `triton.jit`
decides at decoration time whether a kernel is compiled or interpreted). `LORAFLEET_TRITON_LORA=0` turns them off
for `lora_kernel: auto` (which then keeps the PyTorch paths on CUDA).

    TRITON_INTERPRET=1 python -m adapters.triton_lora     # self-check on CPU tensors (see that module)
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

import torch

INSTALL_HINT = "install the extra: pip install 'lorafleet[triton]'"


@cache
def _import() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("adapters.triton_lora"), None
    except ImportError as err:  # triton missing (or a triton too old for the kernels)
        return None, f"triton is not importable ({err}); {INSTALL_HINT}"


def load() -> ModuleType | None:
    """`adapters.triton_lora`, imported on first use, or None when triton is not importable."""
    return _import()[0]


def turned_off() -> bool:
    """`LORAFLEET_TRITON_LORA=0` (or false/no/off): `auto` never picks the Triton kernels."""
    return os.environ.get("LORAFLEET_TRITON_LORA", "1").strip().lower() in ("0", "false", "no", "off")


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the kernels can run on tensors of `device`; otherwise why not, in words."""
    device = torch.device(device)
    module, reason = _import()
    if module is None:
        return reason
    if device.type == "cuda":
        return None
    if module.interpreted():
        return None if device.type == "cpu" else f"the Triton interpreter runs on CPU tensors, not on {device}"
    return (
        f"the Triton kernels run on CUDA; this engine runs on {device} (on CPU they run only under the Triton "
        "interpreter: start the process with TRITON_INTERPRET=1, slow, for tests)"
    )


def require(device: torch.device | str) -> None:
    """Raise RuntimeError with the reason if `lora_kernel: triton` cannot run on `device`."""
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"lora_kernel 'triton': {reason}")


def auto_picks(device: torch.device) -> bool:
    """`lora_kernel: auto` uses the Triton kernels on CUDA when triton imports (and they are not turned off)."""
    return device.type == "cuda" and not turned_off() and load() is not None
