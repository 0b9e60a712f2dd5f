"""Build what one adapter's training needs: the (Q)LoRA model on a frozen base, the optimizer, the LR schedule,
the precision it runs in (bf16 autocast + TF32 on CUDA, fp32 on CPU: jobs/precision.py), and — for bases larger
than one GPU — a DeepSpeed ZeRO-2/3 engine in their place (ZeRO-3 shards the base while loading it:
jobs/deepspeed_zero.py). Not a script; used by jobs/train_loop.py and jobs/cotrain_loop.py."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from adapters.base_models import LoadedBase, QuantizationConfig, load_base
from jobs.config import TrialSpec
from jobs.deepspeed_zero import deepspeed_config, release_sharding, shard_from_start
from jobs.precision import enable_tf32, prepare_kbit_model, training_autocast

log = logging.getLogger(__name__)


@dataclass
class TrainingSetup:
    base: LoadedBase
    model: Any  # the PeftModel (unwrapped)
    optimizer: Any
    scheduler: Any
    total_steps: int
    deepspeed_engine: Any = None
    autocast: Any = None  # () -> the context each training forward runs in (bf16 autocast on CUDA)
    zero3: bool = False  # the model's parameters are ZeRO-3 shards (no single rank holds the model)
    sharding: Any = None  # the registered HfDeepSpeedConfig (ZeRO-3), kept alive while the engine lives
    base_ref: str = ""  # the config's base_model, for a fresh copy (ZeRO-3 evaluation)
    device: str = "cpu"

    def forward_context(self) -> Any:
        return self.autocast() if self.autocast is not None else contextlib.nullcontext()


def prepare_for_lora(base: LoadedBase, gradient_checkpointing: bool) -> Any:
    """The frozen base made ready for LoRA training (k-bit preparation without upcasting activations, gradient
    checkpointing); solo runs and co-training alike."""
    model = base.model
    if base.quantized:
        model = prepare_kbit_model(model, gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def build_peft_model(spec: TrialSpec, device: str) -> tuple[LoadedBase, Any]:
    from peft import LoraConfig, get_peft_model

    base = load_base(spec.base_model, spec.quantization, device=device)  # sharded if a ZeRO-3 config is registered
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


def build_training(spec: TrialSpec, device: str, batches_per_epoch: int, world: int) -> TrainingSetup:
    ds_config = deepspeed_config(spec.deepspeed, spec, world) if spec.deepspeed is not None else None
    sharding = shard_from_start(ds_config) if ds_config is not None else None  # alive until deepspeed.initialize
    if enable_tf32(device):
        log.info("TF32 matmuls enabled on %s", device)
    base, model = build_peft_model(spec, device)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = total_steps(spec, batches_per_epoch)
    optimizer = make_optimizer(spec, params)
    scheduler = make_scheduler(spec, optimizer, steps)
    setup = TrainingSetup(base, model, optimizer, scheduler, steps, base_ref=spec.base_model, device=device)
    if spec.deepspeed is not None:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, model_parameters=params,
        )  # fmt: skip
        setup.deepspeed_engine, setup.optimizer, setup.scheduler = engine, optimizer, scheduler
        setup.zero3, setup.sharding = sharding is not None, sharding
        log.info("DeepSpeed ZeRO-%d engine ready (base sharded while loading: %s)", spec.deepspeed.stage, setup.zero3)
    else:  # DeepSpeed's bf16 config does the engine's casting; plain runs autocast on CUDA
        compute = spec.quantization.compute_dtype
        setup.autocast = lambda: training_autocast(device, compute)
    return setup


@contextlib.contextmanager
def eval_base(setup: TrainingSetup, plain_view: contextlib.AbstractContextManager[LoadedBase]) -> Iterator[LoadedBase]:
    """The base that rank 0's evaluation decodes with: the trained model with its LoRA bypassed (`plain_view`),
    or under ZeRO-3 — where no rank holds the whole model — a fresh, unsharded copy of the base (4-bit nf4 on
    CUDA, so a base too big for one GPU in bf16 still fits; the config's dtype on CPU), dropped afterwards."""
    if not setup.zero3:
        with plain_view as plain:
            yield plain
        return
    release_sharding()
    setup.sharding = None
    on_cuda = setup.device.startswith("cuda")
    quant = QuantizationConfig(mode="nf4" if on_cuda else "none")
    kind = "nf4" if on_cuda else "unquantized"
    print(f"ZeRO-3: rank 0 evaluates on a fresh unsharded copy of {setup.base_ref} ({kind})", flush=True)
    fresh = load_base(setup.base_ref, quant, device=setup.device)
    try:
        yield fresh
    finally:
        del fresh
        if on_cuda:
            torch.cuda.empty_cache()
