"""What an adapter is: a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors), read and validated
against a base model before any tensor touches the engine.

`read_lora(folder, shapes, max_rank)` returns `LoraWeights` (per layer and projection: A [r, in] and B [out, r]
with the LoRA scaling folded into B) or raises `AdapterRejected` with one sentence saying why. Refused: pickle
weights (.bin/.pt) without a safetensors file, a corrupt safetensors file, DoRA, LoRA biases, extra trained modules
(modules_to_save, embeddings, lm_head), shapes that do not fit the base, a rank over the engine's limit, NaN/inf
values or values so large they would overflow (MAX_ABS_WEIGHT), and a base fingerprint (written by lorafleet's
trainer into the safetensors metadata) that differs.

    python -m adapters.lora_files <adapter_dir> --base smollm2-135m     # validate a folder, print a summary
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Metadata keys lorafleet's trainer writes into the safetensors header.
META_BASE_NAME = "lorafleet.base_model"
META_BASE_FINGERPRINT = "lorafleet.base_fingerprint"
# Trained LoRA weights (A, and B with the scaling folded in) are O(0.01-10). Far larger finite values overflow the
# activations to inf/NaN; refuse them like NaN itself. Generous on purpose: it only catches broken or hostile files.
MAX_ABS_WEIGHT = 1e4

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterRejected(ValueError):
    """An adapter that must not be served; the message is the reason, fit for an API error."""


@dataclass(frozen=True)
class BaseShapes:
    """The linear-layer shapes of a Llama-family base, which an adapter's tensors must match."""

    num_layers: int
    io: dict[str, tuple[int, int]]  # projection -> (in_features, out_features)
    fingerprint: str = ""
    name: str = ""

    @classmethod
    def from_config(cls, config: Any, fingerprint: str = "", name: str = "") -> BaseShapes:
        hidden = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q_out = config.num_attention_heads * head_dim
        kv_out = config.num_key_value_heads * head_dim
        inter = config.intermediate_size
        io = {
            "q_proj": (hidden, q_out),
            "k_proj": (hidden, kv_out),
            "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        return cls(config.num_hidden_layers, io, fingerprint, name)


class LoraAdapterConfig(BaseModel):
    """The fields of PEFT's adapter_config.json that decide how the weights apply (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str = "LORA"
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    base_model_name_or_path: str | None = None


@dataclass
class LoraWeights:
    """Validated tensors of one adapter: {(layer, projection): (A [r, in], B_scaled [out, r])}."""

    config: LoraAdapterConfig
    modules: dict[tuple[int, str], tuple[Any, Any]]
    rank: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.modules.values())


def _pattern_value(patterns: dict[str, Any], module_key: str, default: Any) -> Any:
    """PEFT's rule: a pattern applies when it matches the end of the module's dotted name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def read_config(folder: Path) -> LoraAdapterConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterRejected(f"{CONFIG_FILE} is missing")
    try:
        raw = json.loads(path.read_text())
        config = LoraAdapterConfig.model_validate(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterRejected(f"{CONFIG_FILE} is not valid JSON: {err}") from err
    except ValidationError as err:
        first = err.errors()[0]
        raise AdapterRejected(f"{CONFIG_FILE} field '{'.'.join(map(str, first['loc']))}': {first['msg']}") from err
    if config.peft_type.upper() != "LORA":
        raise AdapterRejected(f"peft_type {config.peft_type} is not supported (only LORA)")
    if config.use_dora:
        raise AdapterRejected("DoRA adapters (use_dora) are not supported by the batched-LoRA engine")
    if config.bias != "none":
        raise AdapterRejected(f"LoRA bias '{config.bias}' is not supported (only bias='none')")
    if config.fan_in_fan_out:
        raise AdapterRejected("fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    if config.modules_to_save:
        raise AdapterRejected(f"modules_to_save {config.modules_to_save} would change base weights; not servable")
    return config


def _open_safetensors(folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterRejected(f"only safetensors weights are loaded; found pickle file(s) {pickles}, refused")
        raise AdapterRejected(f"{WEIGHTS_FILE} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterRejected(f"{WEIGHTS_FILE} is corrupt or unreadable: {err}") from err
    return tensors, metadata


def quick_check(folder: Path) -> str | None:
    """Cheap validity check for listings: config parses and the safetensors header is sound. The reason, or None."""
    try:
        read_config(folder)
        path = folder / WEIGHTS_FILE
        if not path.is_file():
            raise AdapterRejected(f"{WEIGHTS_FILE} is missing")
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= min(100_000_000, path.stat().st_size - 8):
                raise AdapterRejected(f"{WEIGHTS_FILE} has a corrupt header")
            json.loads(handle.read(size))
    except AdapterRejected as err:
        return str(err)
    except (OSError, ValueError) as err:
        return f"{WEIGHTS_FILE} is unreadable: {err}"
    return None


def _module_scale(config: LoraAdapterConfig, module_key: str, rank: int) -> float:
    alpha = float(_pattern_value(config.alpha_pattern, module_key, config.lora_alpha))
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def read_lora(folder: Path | str, shapes: BaseShapes, max_rank: int) -> LoraWeights:
    """Read and validate an adapter folder against `shapes`; raise AdapterRejected with the reason."""
    import torch

    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterRejected(f"adapter folder {folder.name} does not exist")
    config = read_config(folder)
    tensors, metadata = _open_safetensors(folder)
    fingerprint = metadata.get(META_BASE_FINGERPRINT)
    if fingerprint and shapes.fingerprint and fingerprint != shapes.fingerprint:
        trained_on = metadata.get(META_BASE_NAME, "another base")
        raise AdapterRejected(f"adapter was trained on {trained_on}, not on this base ({shapes.name or 'unknown'})")

    halves: dict[tuple[int, str], dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if not match:
            raise AdapterRejected(f"tensor '{key}' is not a LoRA A/B weight of a supported projection")
        layer, proj, half = int(match[1]), match[2], match[3]
        if proj not in shapes.io:
            raise AdapterRejected(f"LoRA on '{proj}' is not supported (supported: {', '.join(PROJECTIONS)})")
        if layer >= shapes.num_layers:
            raise AdapterRejected(f"tensor '{key}' targets layer {layer}; the base has {shapes.num_layers} layers")
        halves.setdefault((layer, proj), {})[half] = tensor
    if not halves:
        raise AdapterRejected(f"{WEIGHTS_FILE} holds no LoRA weights")

    modules: dict[tuple[int, str], tuple[Any, Any]] = {}
    max_seen = 0
    for (layer, proj), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterRejected(f"layer {layer} {proj} has lora_{'A' if 'A' not in pair else 'B'} missing")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = shapes.io[proj]
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape != (fan_out, rank):
            raise AdapterRejected(
                f"layer {layer} {proj}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit the base "
                f"({fan_in} -> {fan_out}); the adapter was trained on a different base model"
            )
        if rank > max_rank:
            raise AdapterRejected(f"rank {rank} exceeds the engine's max_lora_rank {max_rank}")
        a, b = a.float(), b.float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterRejected(f"layer {layer} {proj} holds NaN or infinite values")
        module_key = f"model.layers.{layer}.{'self_attn' if proj.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{proj}"
        scale = _module_scale(config, module_key, rank)
        b = b * scale
        largest = max(float(a.abs().max()), float(b.abs().max()))
        if not largest <= MAX_ABS_WEIGHT:
            raise AdapterRejected(
                f"layer {layer} {proj} holds values up to {largest:.3g} (scaling included); over {MAX_ABS_WEIGHT:g} "
                "they would overflow the activations"
            )
        modules[(layer, proj)] = (a.contiguous(), b.contiguous())
        max_seen = max(max_seen, rank)
    return LoraWeights(config=config, modules=modules, rank=max_seen, metadata=metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description="Validate a PEFT LoRA adapter folder against a base model.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--max-rank", type=int, default=64)
    args = parser.parse_args()
    from transformers import AutoConfig

    from adapters.base_models import config_fingerprint, resolve_base

    resolved = resolve_base(args.base)
    config = AutoConfig.from_pretrained(resolved.path)
    shapes = BaseShapes.from_config(config, config_fingerprint(config), resolved.name)
    try:
        weights = read_lora(args.folder, shapes, args.max_rank)
    except AdapterRejected as err:
        raise SystemExit(f"refused: {err}") from None
    print(f"ok: rank {weights.rank}, {len(weights.modules)} modules, {weights.num_parameters:,} parameters")


if __name__ == "__main__":
    main()
