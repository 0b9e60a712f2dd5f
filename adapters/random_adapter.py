"""Random PEFT-format LoRA adapters for tests and benchmarks, written straight from a base's shapes.

The folder is what `PeftModel.save_pretrained` writes (adapter_config.json + adapter_model.safetensors with
PEFT's key names), so PEFT loads it as any trained adapter; no base weights are needed to make one, which keeps
benchmarks on 7B shapes fast. A and B are both non-zero so the adapter really changes the outputs.

    python -m adapters.random_adapter out/my-adapter --base tiny-llama --rank 8
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from adapters.lora_files import (
    CONFIG_FILE,
    META_BASE_FINGERPRINT,
    META_BASE_NAME,
    PROJECTIONS,
    WEIGHTS_FILE,
    BaseShapes,
)


def _module_path(layer: int, proj: str) -> str:
    block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{proj}"


def write_random_adapter(
    out_dir: Path | str,
    shapes: BaseShapes,
    rank: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] = PROJECTIONS,
    seed: int = 0,
    scale: float = 1.0,
    use_rslora: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random adapter; `scale` multiplies B (1.0 gives a delta about as large as the base output)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shapes.num_layers):
        for proj in targets:
            fan_in, fan_out = shapes.io[proj]
            a = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            b = torch.randn(fan_out, rank, generator=gen) * scale / rank**0.5
            tensors[f"{_module_path(layer, proj)}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{_module_path(layer, proj)}.lora_B.weight"] = b.to(dtype).contiguous()
    metadata = {"format": "pt"}
    if shapes.fingerprint:
        metadata[META_BASE_FINGERPRINT] = shapes.fingerprint
        metadata[META_BASE_NAME] = shapes.name
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=metadata)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": shapes.name or None,
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", default="tiny-llama")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoConfig

    from adapters.base_models import config_fingerprint, resolve_base

    resolved = resolve_base(args.base)
    config = AutoConfig.from_pretrained(resolved.path)
    shapes = BaseShapes.from_config(config, config_fingerprint(config), resolved.name)
    print(write_random_adapter(args.out, shapes, rank=args.rank, seed=args.seed))


if __name__ == "__main__":
    main()
