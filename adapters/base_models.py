"""Resolve a base-model reference to a loaded model + tokenizer, optionally 4-bit NF4 (QLoRA).

A reference is one of: `smollm2-135m` (bundled, converted from GGUF once), `tiny-llama` (random, for tests),
a local folder with a config.json, or a Hugging Face id (needs a hub, or a filled HF cache).

    python -m adapters.base_models smollm2-135m --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from adapters.smollm2 import SMOLLM2_NAME, BaseModelNotFound, smollm2_dir
from adapters.tiny_llama import TINY_LLAMA_NAME, tiny_llama_dir

log = logging.getLogger(__name__)

ALIASES = {SMOLLM2_NAME: SMOLLM2_NAME, "smollm2-135m-instruct": SMOLLM2_NAME, TINY_LLAMA_NAME: TINY_LLAMA_NAME}
# Fields of a model config that decide whether an adapter's tensors fit the base.
_FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size",
)  # fmt: skip

DType = Literal["auto", "float32", "bfloat16", "float16"]


class QuantizationConfig(BaseModel):
    """How to load the frozen base. `nf4` is QLoRA's 4-bit NormalFloat via bitsandbytes."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "nf4"] = "none"
    double_quant: bool = True
    # `auto`: bfloat16 on CUDA, float32 on CPU (bf16 matmuls are 15-25x slower on CPUs without bf16 units).
    compute_dtype: DType = "auto"


@dataclass
class ResolvedBase:
    name: str  # canonical name: alias, folder name, or HF id
    path: str  # folder or HF id handed to from_pretrained


@dataclass
class LoadedBase:
    name: str
    path: str
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    quantized: bool
    fingerprint: str


def resolve_base(ref: str) -> ResolvedBase:
    """Map a reference to a canonical name and a loadable location, building bundled models on first use."""
    alias = ALIASES.get(ref.lower())
    if alias == SMOLLM2_NAME:
        return ResolvedBase(SMOLLM2_NAME, str(smollm2_dir()))
    if alias == TINY_LLAMA_NAME:
        return ResolvedBase(TINY_LLAMA_NAME, str(tiny_llama_dir()))
    local = Path(ref).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise BaseModelNotFound(f"base model folder {local} has no config.json")
        return ResolvedBase(local.resolve().name, str(local.resolve()))
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        known = ", ".join(sorted(set(ALIASES.values())))
        raise BaseModelNotFound(f"base model '{ref}' not found: not a bundled name ({known}), folder or HF id")
    return ResolvedBase(ref, ref)


def torch_dtype(name: DType, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def config_fingerprint(config: Any) -> str:
    """Short hash of the architecture fields an adapter's shapes depend on."""
    fields = {f: getattr(config, f, None) for f in _FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def _bnb_config(quant: QuantizationConfig, device: str):
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch_dtype(quant.compute_dtype, device)
    if not device.startswith("cuda") and compute == torch.bfloat16:
        log.warning("nf4 with bfloat16 compute on CPU is 15-25x slower than float32 compute on CPUs without bf16")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def _one_bnb_cpu_path(model: Any) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks each 4-bit layer on its first inference forward and
    computes it in bfloat16 from then on. That repacking fails ("shape ... is invalid") for layers whose in_features
    is not a multiple of the quantization block (the tiny test model's down_proj: 160 inputs, blocks of 64), and it
    makes a model's outputs depend on which CPU kind a replica landed on. Every 4-bit layer keeps bitsandbytes'
    generic CPU path instead: the same numbers on every CPU (CPU 4-bit is for development; GPUs serve QLoRA)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _zero3_sharded() -> bool:
    """A DeepSpeed ZeRO-3 config is registered: `from_pretrained` built the model as shards that DeepSpeed places
    (jobs/deepspeed_zero.py); moving them is DeepSpeed's job."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def load_base(
    ref: str,
    quantization: QuantizationConfig | None = None,
    device: str = "cpu",
    dtype: DType = "auto",
) -> LoadedBase:
    """Load base model and tokenizer. Unquantized weights use `dtype`; nf4 keeps non-quantized parts in compute dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant = quantization or QuantizationConfig()
    resolved = resolve_base(ref)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype, device)}
    if quant.mode == "nf4":
        kwargs["quantization_config"] = _bnb_config(quant, device)
        kwargs["dtype"] = torch_dtype(quant.compute_dtype, device)
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except OSError as err:
        offline = " (HF_HUB_OFFLINE is set: no hub downloads)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise BaseModelNotFound(f"base model '{ref}' could not be loaded{offline}: {err}") from err
    if quant.mode != "nf4" and not _zero3_sharded():
        model.to(device)
    elif str(device).split(":")[0] == "cpu":
        _one_bnb_cpu_path(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    log.info("loaded base %s from %s (%s, nf4=%s)", resolved.name, resolved.path, kwargs["dtype"], quant.mode == "nf4")
    return LoadedBase(
        name=resolved.name,
        path=resolved.path,
        model=model,
        tokenizer=tokenizer,
        quantized=quant.mode == "nf4",
        fingerprint=config_fingerprint(model.config),
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", nargs="?", default=SMOLLM2_NAME)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--nf4", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    base = load_base(args.ref, QuantizationConfig(mode="nf4" if args.nf4 else "none"))
    text = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = base.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = base.model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(base.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
