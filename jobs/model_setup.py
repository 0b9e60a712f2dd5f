"""Build what one adapter's training needs: the (Q)LoRA model on a frozen base, the optimizer, the LR schedule,
and — for bases larger than one GPU — a DeepSpeed ZeRO-2/3 engine in their place."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from adapters.base_models import LoadedBase, load_base
from jobs.config import DeepSpeedSettings, TrialSpec

log = logging.getLogger(__name__)


@dataclass
class TrainingSetup:
    base: LoadedBase
    model: Any  # the PeftModel (unwrapped)
    optimizer: Any
    scheduler: Any
    total_steps: int
    deepspeed_engine: Any = None


def prepare_for_lora(base: LoadedBase, gradient_checkpointing: bool) -> Any:
    """The frozen base made ready for LoRA training (k-bit preparation, gradient checkpointing); solo runs and
    co-training alike."""
    from peft import prepare_model_for_kbit_training

    model = base.model
    if base.quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def build_peft_model(spec: TrialSpec, device: str) -> tuple[LoadedBase, Any]:
    from peft import LoraConfig, get_peft_model

    base = load_base(spec.base_model, spec.quantization, device=device)
    model = prepare_for_lora(base, spec.training.gradient_checkpointing)
    lora = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.modules(),
        use_rslora=spec.lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.training.seed)  # the LoRA init is part of the run's identity
    peft_model = get_peft_model(model, lora)
    peft_model.config.use_cache = False
    return base, peft_model


def total_steps(spec: TrialSpec, batches_per_epoch: int) -> int:
    t = spec.training
    if t.max_steps is not None:
        return t.max_steps
    return max(1, math.ceil(t.epochs * batches_per_epoch / t.grad_accum))  # type: ignore[operator]


def make_optimizer(spec: TrialSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = spec.training
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    if not torch.cuda.is_available():
        raise RuntimeError(f"optimizer {t.optimizer} needs a CUDA GPU (bitsandbytes paged optimizers)")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW32bit if t.optimizer == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def make_scheduler(spec: TrialSpec, optimizer: torch.optim.Optimizer, steps: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[spec.training.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=min(spec.training.warmup_steps, steps),
                         num_training_steps=steps)  # fmt: skip


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


def build_training(spec: TrialSpec, device: str, batches_per_epoch: int, world: int) -> TrainingSetup:
    base, model = build_peft_model(spec, device)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = total_steps(spec, batches_per_epoch)
    optimizer = make_optimizer(spec, params)
    scheduler = make_scheduler(spec, optimizer, steps)
    setup = TrainingSetup(base, model, optimizer, scheduler, steps)
    if spec.deepspeed is not None:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(spec.deepspeed, spec, world), model_parameters=params,
        )  # fmt: skip
        setup.deepspeed_engine, setup.optimizer, setup.scheduler = engine, optimizer, scheduler
        log.info("DeepSpeed ZeRO-%d engine ready", spec.deepspeed.stage)
    return setup
