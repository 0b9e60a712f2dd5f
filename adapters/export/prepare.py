"""What every export format shares: the checks that refuse an adapter or base with a reason, loading the adapter
against its base, merging it, the prompt metadata, and writing an output folder atomically.

An export is written into a hidden sibling folder and renamed to `--out` at the end (`atomic_folder`), so a failed
or interrupted export never leaves a half-written file where a user would look for it.

    python -m adapters.export.prepare /path/to/adapter --base tiny-llama    # run the checks only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.lora_files import CONFIG_FILE, PROJECTIONS, WEIGHTS_FILE, AdapterRejected, BaseShapes, read_lora
from adapters.prompt_format import PromptFormat, PromptFormatError, read_prompt_format

MAX_EXPORT_RANK = 256  # llama.cpp has no limit; the writer is tested up to this (and f16 B-scaled weights)
SUPPORTED_DTYPES = ("F32", "F16", "BF16")  # adapter tensor dtypes the writers read (safetensors names)
# Architectures llama.cpp loads as `llama` and whose weights map one-to-one onto its tensor names.
LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)


class ExportRefused(ValueError):
    """This adapter or base cannot be exported in the asked format; the message says why."""


@dataclass
class ExportSource:
    """A validated adapter and the base it applies to, ready for any writer."""

    adapter_dir: Path
    base: Any  # adapters.base_models.LoadedBase, float32
    lora: Any  # adapters.lora_files.LoraWeights (B carries the LoRA scaling)
    prompt: PromptFormat | None


def read_prompt_meta(adapter_dir: Path) -> PromptFormat | None:
    """The adapter's `lorafleet_prompt.json` (adapters/prompt_format.py), None if it has none."""
    try:
        return read_prompt_format(adapter_dir)
    except PromptFormatError as err:
        raise ExportRefused(str(err)) from err


def check_base_for_llama_cpp(config: Any) -> None:
    """Refuse bases llama.cpp cannot load as its `llama` architecture with weights mapped one-to-one."""
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "model_type", None) != "llama" or not set(archs) & set(LLAMA_ARCHITECTURES):
        raise ExportRefused(
            f"base architecture {archs or getattr(config, 'model_type', '?')} is not supported for GGUF export "
            f"(supported: {', '.join(LLAMA_ARCHITECTURES)})"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportRefused("bases with attention or MLP biases are not supported for GGUF export")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ExportRefused(f"base uses RoPE scaling '{rope_type}'; the GGUF writer supports only default RoPE")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportRefused(f"base activation '{config.hidden_act}' is not llama.cpp's llama (silu)")


def check_adapter_files(adapter_dir: Path) -> None:
    """Export-specific refusals with the export's wording, before the engine's validation runs."""
    config_path = adapter_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ExportRefused(f"{adapter_dir} has no {CONFIG_FILE}")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportRefused(f"{CONFIG_FILE} is not valid JSON: {err}") from err
    if raw.get("use_dora"):
        raise ExportRefused(
            "DoRA adapters (use_dora) cannot be exported: llama.cpp's LoRA GGUF has no magnitude vector"
        )
    if raw.get("modules_to_save"):
        raise ExportRefused(f"modules_to_save {raw['modules_to_save']} cannot be carried by a LoRA GGUF")
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        return  # read_lora names the missing or pickle file
    try:
        with open(weights, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= min(100_000_000, weights.stat().st_size - 8):
                raise ValueError("header size out of range")
            header = json.loads(handle.read(size))
    except (OSError, ValueError) as err:
        raise ExportRefused(f"{WEIGHTS_FILE} is corrupt or unreadable: {err}") from err
    keys = [k for k in header if k != "__metadata__"]
    unsupported = sorted({_module_of(k) for k in keys if _module_of(k) and _module_of(k) not in PROJECTIONS})
    if unsupported:
        raise ExportRefused(
            f"LoRA on {', '.join(unsupported)} cannot be exported: the LoRA GGUF carries only {', '.join(PROJECTIONS)}"
        )
    dtypes = sorted({header[k]["dtype"] for k in keys} - set(SUPPORTED_DTYPES))
    if dtypes:
        raise ExportRefused(f"adapter tensor dtype(s) {dtypes} are not supported (supported: {SUPPORTED_DTYPES})")


def _module_of(key: str) -> str | None:
    """`...layers.3.self_attn.q_proj.lora_A.weight` -> `q_proj`; `...lm_head.lora_B.weight` -> `lm_head`."""
    parts = key.split(".")
    for marker in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        if marker in parts:
            return parts[parts.index(marker) - 1]
    return None


def load_source(adapter_dir: Path | str, base_ref: str) -> ExportSource:
    """Validate the adapter, load the base in float32 and the adapter against it; ExportRefused with the reason."""
    from adapters.base_models import load_base

    adapter_dir = Path(adapter_dir)
    check_adapter_files(adapter_dir)
    base = load_base(base_ref, dtype="float32")
    shapes = BaseShapes.from_config(base.model.config, base.fingerprint, base.name)
    try:
        lora = read_lora(adapter_dir, shapes, MAX_EXPORT_RANK)
    except AdapterRejected as err:
        raise ExportRefused(str(err)) from err
    return ExportSource(adapter_dir, base, lora, read_prompt_meta(adapter_dir))


def base_source(base_ref: str) -> ExportSource:
    """The base alone (no adapter), for a base GGUF that `gguf-lora` files load on top of."""
    from adapters.base_models import load_base

    return base_only(load_base(base_ref, dtype="float32"))


def base_only(base: Any) -> ExportSource:
    """An already loaded float32 base (adapters.base_models.LoadedBase) as a source with no adapter."""
    from adapters.lora_files import LoraAdapterConfig, LoraWeights

    return ExportSource(Path(base.path), base, LoraWeights(LoraAdapterConfig(r=1, lora_alpha=1.0), {}, 0), None)


def merged_state_dict(source: ExportSource) -> dict[str, Any]:
    """The base's state dict with W + B_scaled @ A added to every adapted projection (float32, new tensors)."""
    state = {k: v.detach().clone() for k, v in source.base.model.state_dict().items()}
    for (layer, proj), (a, b) in source.lora.modules.items():
        part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        key = f"model.layers.{layer}.{part}.{proj}.weight"
        state[key] = state[key].float() + b.float() @ a.float()
    return state


@contextlib.contextmanager
def atomic_folder(out: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to `out` (which must not exist or be empty)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportRefused(f"output {out} already exists and is not an empty folder; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the export is an ordinary folder like any mkdir's
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the export checks on an adapter folder.")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--base", default="smollm2-135m")
    args = parser.parse_args()
    try:
        source = load_source(args.adapter, args.base)
        check_base_for_llama_cpp(source.base.model.config)
    except ExportRefused as err:
        raise SystemExit(f"refused: {err}") from None
    print(f"ok: rank {source.lora.rank}, {len(source.lora.modules)} modules, prompt metadata: {source.prompt}")


if __name__ == "__main__":
    main()
