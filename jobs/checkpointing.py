"""Save and restore one adapter's training state, and write the final adapter in the served format.

A checkpoint folder holds the adapter (safetensors + adapter_config.json, the same files serving loads) and
`trainer_state.pt` (optimizer, LR schedule, optimizer step and micro-batch position; tensors and numbers only,
loaded with `weights_only=True`). The final adapter's safetensors header records the base model's name and
architecture fingerprint, so serving can refuse it on another base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapters.lora_files import META_BASE_FINGERPRINT, META_BASE_NAME, WEIGHTS_FILE

STATE_FILE = "trainer_state.pt"
PROGRESS_FILE = "progress.json"


def save_adapter(model: Any, folder: Path, base_name: str, fingerprint: str) -> Path:
    """PEFT's files, with lorafleet's base metadata in the safetensors header."""
    from peft import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(folder))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    metadata = {"format": "pt", META_BASE_NAME: base_name, META_BASE_FINGERPRINT: fingerprint}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
    return folder


def save_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any, step: int, micro_index: int,
                    base_name: str, fingerprint: str, extra: dict[str, Any] | None = None) -> Path:  # fmt: skip
    save_adapter(model, folder, base_name, fingerprint)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / STATE_FILE)
    (folder / PROGRESS_FILE).write_text(json.dumps({"step": step, "micro_index": micro_index, **(extra or {})}))
    return folder


def load_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore adapter weights and optimizer/schedule in place; return the progress record."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(str(folder / WEIGHTS_FILE)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"checkpoint {folder} does not fit this model: unexpected keys {unexpected[:3]}")
    state = torch.load(folder / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return json.loads((folder / PROGRESS_FILE).read_text())
