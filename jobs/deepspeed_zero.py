"""DeepSpeed ZeRO-2/3 for one adapter's training (bases larger than one GPU): the ZeRO config, the base sharded
from the start under ZeRO-3, the adapter gathered from its shards, and every rank's training state in checkpoints.

- Sharded from the start: `shard_from_start` registers an `HfDeepSpeedConfig` before the base is loaded, so
  `from_pretrained` builds it inside `deepspeed.zero.Init` and no rank ever holds the whole base.
- Saving: `trainable_state` gathers the (partitioned) LoRA parameters on every rank (a collective: every rank
  calls it) and returns full CPU copies; rank 0 writes them.
- Checkpoints: every rank writes its own ZeRO shard (`save_engine_state`) into its checkpoint folder; Ray Train
  merges the folders of all ranks into one checkpoint, and on resume each rank loads its own shard back
  (`load_engine_state`: optimizer partitions, fp32 master weights, LR schedule).
- Evaluation: the sharded model cannot be decoded by one rank; `jobs.config` refuses quick evals
  (`training.eval_every`) under ZeRO-3 and the final evaluation runs on a fresh, unsharded copy of the base on
  rank 0 (`release_sharding` first), with the saved adapter — see jobs/train_loop.py.

Not a script; used by jobs/model_setup.py, jobs/checkpointing.py and jobs/train_loop.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from jobs.config import DeepSpeedSettings, TrialSpec

DS_DIR = "deepspeed"  # inside a checkpoint folder: every rank's ZeRO files
DS_TAG = "state"


def deepspeed_config(settings: DeepSpeedSettings, spec: TrialSpec, world: int) -> dict[str, Any]:
    """A ZeRO config for the trial's batch sizes; optimizer and schedule stay ours (passed in)."""
    zero: dict[str, Any] = {"stage": settings.stage, "overlap_comm": True, "contiguous_gradients": True}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if settings.offload_params and settings.stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": spec.training.micro_batch_size,
        "gradient_accumulation_steps": spec.training.grad_accum,
        "train_batch_size": spec.training.micro_batch_size * spec.training.grad_accum * world,
        "zero_optimization": zero,
        "gradient_clipping": spec.training.max_grad_norm or 0.0,
        "zero_allow_untested_optimizer": True,
    }
    if torch.cuda.is_available() and spec.quantization.compute_dtype in ("auto", "bfloat16"):
        config["bf16"] = {"enabled": True}
    return config


def shard_from_start(config: dict[str, Any]) -> Any:
    """Under ZeRO-3, make transformers build the next `from_pretrained` model inside `deepspeed.zero.Init`
    (each rank materialises only its partition). Keep the returned object alive until `deepspeed.initialize`;
    None for ZeRO-2 (the base is replicated there)."""
    if config["zero_optimization"]["stage"] != 3:
        return None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed()  # adopts the process group (Ray Train's) so the config sees the real world size
    return HfDeepSpeedConfig(config)


def release_sharding() -> None:
    """The next `from_pretrained` loads a plain, unsharded model again (for rank 0's final evaluation)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """A ZeRO-3 parameter: its data lives in shards over the ranks (`ds_id` is set by zero.Init/initialize)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Inside, ZeRO-3 parameters hold their full data on every rank (a collective); others are left alone."""
    sharded = [p for p in params if is_partitioned(p)]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
        yield


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable (LoRA) parameters, keyed like `model.state_dict()`. Under ZeRO-3 every rank
    must call this (the parameters are gathered from all ranks)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in named]):
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in named}


def save_engine_state(engine: Any, folder: Path) -> None:
    """This rank's ZeRO state (optimizer partition, fp32 master weights, LR schedule) under `folder/deepspeed`.
    A collective: every rank calls it with its own folder."""
    engine.save_checkpoint(str(folder / DS_DIR), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)


def has_engine_state(folder: Path) -> bool:
    return (folder / DS_DIR / DS_TAG).is_dir()


def load_engine_state(engine: Any, folder: Path) -> None:
    """Each rank restores its own shard from a checkpoint holding every rank's files (a collective)."""
    path, _ = engine.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)  # fmt: skip
    if path is None:
        raise RuntimeError(f"checkpoint {folder}: DeepSpeed found no state under {DS_DIR}/{DS_TAG}")
