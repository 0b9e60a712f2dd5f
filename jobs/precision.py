"""Numeric precision of training, chosen at run time from the device and the config: bf16 autocast and TF32 on CUDA,
plain fp32 on CPU (CPUs without bf16 units run bf16 15-25x slower), and QLoRA preparation that keeps the base's
activations in the compute dtype.

QLoRA needs only three things in higher precision: the trainable LoRA weights (PEFT keeps adapter weights in fp32,
`autocast_adapter_dtype`), the optimizer state (fp32, from those weights) and the loss (jobs/train_loop.py takes the
cross-entropy over fp32 logits). PEFT's `prepare_model_for_kbit_training` also casts every norm, the embeddings and
the LM head to fp32, which makes each layer's activations fp32 and leaves only the bitsandbytes matmuls in bf16;
`prepare_kbit_model` does not (except for float16 compute, where fp16 norms can overflow: PEFT's recipe is kept).

Not a script; used by jobs/model_setup.py and jobs/train_loop.py.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def autocast_dtype(device: str, compute_dtype: str) -> torch.dtype | None:
    """The autocast dtype for training on `device` with the config's `quantization.compute_dtype`; None = no
    autocast (CPU, or float32 asked for)."""
    if not str(device).startswith("cuda"):
        return None
    return {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(compute_dtype)


def training_autocast(device: str, compute_dtype: str) -> contextlib.AbstractContextManager[Any]:
    """The context the training forward runs in: `torch.autocast` on CUDA, nothing on CPU."""
    dtype = autocast_dtype(device, compute_dtype)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def enable_tf32(device: str) -> bool:
    """TF32 tensor-core matmuls for whatever still runs in fp32 on an Ampere+ GPU (the LoRA weights' optimizer
    math, fp32 logits); a no-op on CPU. Returns whether it was enabled."""
    if not str(device).startswith("cuda"):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    return True


def prepare_kbit_model(model: Any, gradient_checkpointing: bool) -> Any:
    """A 4-bit base made ready for LoRA training without upcasting its activations: base frozen, gradient
    checkpointing (non-reentrant) with input gradients so checkpointed segments backpropagate into the LoRA
    weights. Float16 compute keeps PEFT's full preparation (fp32 norms)."""
    compute = _compute_dtype(model)
    if compute == torch.float16:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    log.info("4-bit base prepared for LoRA with %s activations (no fp32 upcast of norms/embeddings/lm_head)", compute)
    return model


def _compute_dtype(model: Any) -> torch.dtype:
    """The dtype of the base's non-quantized floating parameters (norms, embeddings): its activation dtype."""
    for param in model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32
