"""Save and restore one adapter's training state, and write the final adapter in the served format.

A checkpoint folder holds the adapter (safetensors + adapter_config.json, the same files serving loads) and
`trainer_state.pt` (optimizer, LR schedule, optimizer step and micro-batch position; tensors and numbers only,
loaded with `weights_only=True`). The final adapter's safetensors header records the base model's name and
architecture fingerprint, so serving can refuse it on another base.

Under DeepSpeed the engine owns optimizer and schedule, partitioned over the ranks: every rank writes its own
shard into `deepspeed/` of its checkpoint folder (Ray Train merges the ranks' folders into one checkpoint) and
restores it on resume; under ZeRO-3 the adapter is saved from parameters gathered over all ranks, so every rank
calls `save_adapter`/`save_checkpoint` and rank 0 writes the adapter (jobs/deepspeed_zero.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from adapters.lora_files import META_BASE_FINGERPRINT, META_BASE_NAME, WEIGHTS_FILE
from jobs.deepspeed_zero import has_engine_state, load_engine_state, save_engine_state, trainable_state

STATE_FILE = "trainer_state.pt"
PROGRESS_FILE = "progress.json"


def save_adapter(model: Any, folder: Path, base_name: str, fingerprint: str, rank: int = 0) -> Path | None:
    """PEFT's files, with lorafleet's base metadata in the safetensors header, written by rank 0 (None elsewhere).
    The weights come from the trainable parameters gathered over all ranks under ZeRO-3 (then every rank must
    call this), from the local ones otherwise."""
    from peft import get_peft_model_state_dict

    state = trainable_state(model)  # a collective under ZeRO-3
    if rank != 0:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(folder))
    tensors = {k: v.contiguous() for k, v in get_peft_model_state_dict(model, state_dict=state).items()}
    metadata = {"format": "pt", META_BASE_NAME: base_name, META_BASE_FINGERPRINT: fingerprint}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
    return folder


def save_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any, step: int, micro_index: int,
                    base_name: str, fingerprint: str, extra: dict[str, Any] | None = None, rank: int = 0,
                    engine: Any = None) -> Path | None:  # fmt: skip
    """Rank 0's folder holds the adapter, the progress record and (without DeepSpeed) optimizer + schedule; with
    a DeepSpeed `engine` every rank writes its ZeRO shard into its own folder. Returns the folder this rank
    reports (None: nothing from this rank). Every rank calls it."""
    folder.mkdir(parents=True, exist_ok=True)
    if engine is not None:
        save_engine_state(engine, folder)  # a collective: this rank's optimizer partition and the schedule
    if save_adapter(model, folder, base_name, fingerprint, rank) is None:
        return folder if engine is not None else None
    if engine is None:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / STATE_FILE)
    (folder / PROGRESS_FILE).write_text(json.dumps({"step": step, "micro_index": micro_index, **(extra or {})}))
    return folder


def load_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any, engine: Any = None) -> dict[str, Any]:
    """Restore adapter weights and optimizer/schedule in place (with a DeepSpeed `engine`: this rank's shard,
    on every rank); return the progress record."""
    from peft import set_peft_model_state_dict

    if engine is not None:
        if not has_engine_state(folder):
            raise RuntimeError(f"checkpoint {folder} holds no DeepSpeed state (saved by a run without DeepSpeed?)")
        load_engine_state(engine, folder)
        return json.loads((folder / PROGRESS_FILE).read_text())
    result = set_peft_model_state_dict(model, load_file(str(folder / WEIGHTS_FILE)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"checkpoint {folder} does not fit this model: unexpected keys {unexpected[:3]}")
    state = torch.load(folder / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return json.loads((folder / PROGRESS_FILE).read_text())
