"""The training sections of the GPU self-check (bench/gpu_check.py): QLoRA nf4 through lorafleet's own training loop
against a plain HF + PEFT + bitsandbytes loop on the same base and batch shape, and bf16-autocast vs fp32 training
parity on the tiny model. Each function returns a JSON-able dict; nothing here imports Ray or MLflow.

Not a script: run `python -m bench.gpu_check`.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _decreasing(losses: list[float]) -> bool:
    """The mean of the last quarter of the steps is below the mean of the first quarter."""
    q = max(1, len(losses) // 4)
    return bool(losses) and all(map(math.isfinite, losses)) and sum(losses[-q:]) / q < sum(losses[:q]) / q


def qlora_lorafleet(base: str, device: str, steps: int, micro_batch: int, seq_len: int) -> dict[str, Any]:
    """nf4 QLoRA (r=16, all seven projections, gradient checkpointing) with `jobs.train_loop.train` on a bundled
    task, packed rows of `seq_len` tokens: tokens/s, peak CUDA memory, the loss curve."""
    from jobs.config import SweepConfig
    from jobs.train_loop import PrintHooks, train

    on_cuda = device.startswith("cuda")
    config = SweepConfig(
        name="gpu-check", base_model=base, tasks=["sentiment"], quantization={"mode": "nf4", "compute_dtype": "auto"},
        lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        training={"max_steps": steps, "micro_batch_size": micro_batch, "max_seq_len": seq_len, "packing": True,
                  "gradient_checkpointing": True, "learning_rate": 1e-3, "warmup_steps": 2, "log_every": 1,
                  "checkpoint_every": steps + 1, "optimizer": "paged_adamw_32bit" if on_cuda else "adamw"},
    )  # fmt: skip
    losses: list[float] = []

    class Hooks(PrintHooks):
        def log(self, step: int, metrics: dict[str, float]) -> None:
            if "loss" in metrics:
                losses.append(metrics["loss"])

    _reset_peak(device)
    with tempfile.TemporaryDirectory() as tmp:
        outcome = train(config.trials()[0], Hooks(), Path(tmp) / "adapter", device=device, final_eval=False)
    return {"steps": outcome.steps, "tokens_per_s": outcome.tokens_per_s, "peak_gb": _peak_gb(device),
            "first_loss": losses[0], "last_loss": losses[-1], "loss_decreasing": _decreasing(losses),
            "losses": losses}  # fmt: skip


def qlora_hf_reference(path: str, device: str, steps: int, micro_batch: int, seq_len: int) -> dict[str, Any]:
    """The same QLoRA recipe as the HF docs write it: `BitsAndBytesConfig` nf4, `prepare_model_for_kbit_training`,
    PEFT LoRA, paged AdamW, `model(..., labels=)`; random-token batches of the same shape (2 warm-up steps not
    timed)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    on_cuda = device.startswith("cuda")
    compute = torch.bfloat16 if on_cuda else torch.float32
    _reset_peak(device)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute,
                                                 device_map={"": device})  # fmt: skip
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PROJECTIONS,
                                             task_type="CAUSAL_LM"))  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    if on_cuda:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW32bit(params, lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 256)
    losses, started = [], 0.0
    model.train()
    for step in range(steps + 2):
        if step == 2:
            if on_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        ids = torch.randint(3, vocab, (micro_batch, seq_len), generator=generator).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {"steps": steps, "tokens_per_s": steps * micro_batch * seq_len / seconds, "peak_gb": _peak_gb(device),
              "first_loss": losses[0], "last_loss": losses[-1]}  # fmt: skip
    del model, optimizer, params
    _reset_peak(device)
    return result


def precision_parity(device: str, steps: int) -> dict[str, Any]:
    """The tiny model's LoRA trained twice from the same init on the same batches: fp32, and fp32 master weights
    with the forward under `jobs.precision.training_autocast` (bf16 on CUDA; nothing on CPU, where both runs are
    fp32). Reports both loss curves and their largest relative gap."""
    from peft import LoraConfig, get_peft_model

    from adapters.base_models import load_base
    from jobs.precision import autocast_dtype, training_autocast

    curves = {}
    for name, compute in (("fp32", "float32"), ("autocast", "bfloat16")):
        base = load_base("tiny-llama", device=device, dtype="float32")
        torch.manual_seed(0)
        model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS, lora_dropout=0.0))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        generator = torch.Generator().manual_seed(1)
        losses = []
        model.train()
        for _ in range(steps):
            ids = torch.randint(3, 64, (8, 64), generator=generator).to(device)
            with training_autocast(device, compute):
                logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1))  # fmt: skip
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        curves[name] = losses
    gap = max(abs(a - b) / abs(a) for a, b in zip(curves["fp32"], curves["autocast"], strict=True))
    dtype = autocast_dtype(device, "bfloat16")
    return {"autocast_dtype": str(dtype).removeprefix("torch.") if dtype else None, "max_relative_gap": gap,
            "fp32_last": curves["fp32"][-1], "autocast_last": curves["autocast"][-1],
            "both_decreasing": _decreasing(curves["fp32"]) and _decreasing(curves["autocast"]),
            "ok": gap < 0.05 and _decreasing(curves["autocast"])}  # fmt: skip
