"""GPU-correct training, checked on CPU: the precision chosen per device (bf16 autocast + TF32 on CUDA only), QLoRA
preparation that keeps a bf16 base's activations in bf16 (unlike PEFT's `prepare_model_for_kbit_training`), the
eval engine's dtype following it, fractional-GPU memory caps, and the ZeRO-3 refusals at config load."""

from __future__ import annotations

import contextlib

import pytest
import torch

from adapters.base_models import QuantizationConfig, load_base
from jobs.config import SweepConfig
from jobs.gpu_share import HEADROOM, cap_memory, memory_fraction
from jobs.precision import autocast_dtype, enable_tf32, prepare_kbit_model, training_autocast


def test_autocast_and_tf32_are_chosen_per_device() -> None:
    assert autocast_dtype("cuda", "auto") is torch.bfloat16
    assert autocast_dtype("cuda:1", "bfloat16") is torch.bfloat16
    assert autocast_dtype("cuda", "float16") is torch.float16
    assert autocast_dtype("cuda", "float32") is None  # asked for fp32: no autocast
    assert autocast_dtype("cpu", "auto") is None and autocast_dtype("cpu", "bfloat16") is None
    assert isinstance(training_autocast("cpu", "auto"), contextlib.nullcontext)
    before = torch.backends.cuda.matmul.allow_tf32
    assert enable_tf32("cpu") is False and torch.backends.cuda.matmul.allow_tf32 == before


def _nf4_bf16():
    return load_base("tiny-llama", QuantizationConfig(mode="nf4", compute_dtype="bfloat16"), device="cpu")


def _float_dtypes(model) -> dict[str, torch.dtype]:
    inner = model.model
    return {"embed": inner.embed_tokens.weight.dtype, "norm": inner.norm.weight.dtype,
            "layer_norm": inner.layers[0].input_layernorm.weight.dtype, "lm_head": model.lm_head.weight.dtype}  # fmt: skip


def test_qlora_preparation_keeps_bf16_activations_where_peft_upcasts() -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from serve_app.engine import EngineConfig, LoraEngine

    peft_prepared = prepare_model_for_kbit_training(_nf4_bf16().model, use_gradient_checkpointing=False)
    assert set(_float_dtypes(peft_prepared).values()) == {torch.float32}  # what PEFT's recipe does

    base = _nf4_bf16()
    model = prepare_kbit_model(base.model, gradient_checkpointing=True)
    assert set(_float_dtypes(model).values()) == {torch.bfloat16}
    assert model.is_gradient_checkpointing and not any(p.requires_grad for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())

    ids = torch.tensor([[5, 9, 12, 40, 41, 7]])
    hidden: list[torch.dtype] = []
    layer = peft_model.base_model.model.model.layers[0]
    handle = layer.register_forward_hook(
        lambda _m, _i, out: hidden.append((out[0] if isinstance(out, tuple) else out).dtype)
    )
    peft_model.train()
    logits = peft_model(input_ids=ids).logits
    handle.remove()
    assert hidden == [torch.bfloat16] and logits.dtype == torch.bfloat16  # activations stayed bf16
    torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert any(p.grad.abs().sum() > 0 for p in trainable.values())

    engine = LoraEngine(base, EngineConfig(device="cpu", dtype="bfloat16", max_running=2, max_seq_len=32))
    assert engine.dtype == torch.bfloat16  # the eval engine of a bf16 QLoRA run decodes in bf16


def test_fractional_gpus_cap_memory_to_their_share() -> None:
    assert memory_fraction(0.25) == pytest.approx(0.25 - HEADROOM)
    assert memory_fraction(0.5) == pytest.approx(0.5 - HEADROOM)
    four = 4 * memory_fraction(0.25)
    assert four < 1 - 3 * HEADROOM  # four packed workers leave room for their CUDA contexts
    assert memory_fraction(1) is None and memory_fraction(2) is None and memory_fraction(0) is None
    assert cap_memory(0.25, "cpu") is None  # CPU workers: nothing to cap


def _zero3(**changes):
    base = {"name": "z", "base_model": "tiny-llama", "tasks": ["sentiment"], "deepspeed": {"stage": 3}}
    return SweepConfig.model_validate({**base, **changes})


def test_zero3_refuses_nf4_and_quick_evals_at_config_load() -> None:
    with pytest.raises(ValueError, match=r"quantization\.mode: nf4 cannot be sharded by deepspeed\.stage 3"):
        _zero3(quantization={"mode": "nf4"})
    with pytest.raises(ValueError, match=r"training\.eval_every: quick evals need the whole model"):
        _zero3(training={"eval_every": 10})
    with pytest.raises(ValueError, match=r"quantization\.mode: nf4"):  # also when a grid point makes it nf4
        _zero3(grid={"quantization.mode": ["none", "nf4"]})
    assert _zero3().deepspeed.stage == 3
    assert _zero3(quantization={"mode": "nf4"}, deepspeed={"stage": 2}).quantization.mode == "nf4"
