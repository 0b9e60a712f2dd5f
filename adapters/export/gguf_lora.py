"""Export format `gguf-lora`: the adapter alone as a llama.cpp LoRA GGUF (what `llama-cli --lora FILE` and
llama-cpp-python's `Llama(lora_path=FILE)` load on top of the base GGUF).

Per adapted projection the file holds `blk.N.<name>.weight.lora_a` (A, [r, in]) and `.lora_b` (B, [out, r]);
llama.cpp adds scale * B @ (A @ x) with scale = user_scale * alpha / r, or user_scale when alpha is 0. The writer
folds PEFT's scaling (alpha / r, rsLoRA and per-module patterns included) into B and writes alpha = 0, so every
module gets exactly the scaling it was trained with. q_proj / k_proj B rows get llama.cpp's RoPE row order.
A base GGUF to load it on: `lorafleet export ... --format gguf` of the same base (any adapter), or the base's own.

    lorafleet export sentiment --format gguf-lora --quant f16 --out exports/sentiment-lora
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapters.export.gguf_llama import PROJECTION_NAMES, encode, permute_for
from adapters.export.prepare import ExportRefused, ExportSource, atomic_folder, check_base_for_llama_cpp

LORA_QUANTS = ("f32", "f16", "q8_0")


def lora_file_name(name: str, quant: str) -> str:
    return f"{name}-lora-{quant}.gguf"


def _qtype(quant: str, rows: int, what: str):
    from gguf import GGMLQuantizationType as T

    if quant == "q8_0" and rows % 32:
        raise ExportRefused(f"{what}: row size {rows} is not a multiple of 32; q8_0 needs that (use f16 or f32)")
    return {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0}[quant]


def write_gguf_lora(source: ExportSource, path: Path, quant: str, name: str) -> None:
    import gguf

    if quant not in LORA_QUANTS:
        raise ExportRefused(f"quant '{quant}' is not supported for gguf-lora (supported: {', '.join(LORA_QUANTS)})")
    config = source.base.model.config
    check_base_for_llama_cpp(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # scaling is folded into B
    writer.add_name(name)
    for (layer, proj), (a, b) in sorted(source.lora.modules.items()):
        part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        hf_key = f"model.layers.{layer}.{part}.{proj}.weight"
        target = f"blk.{layer}.{PROJECTION_NAMES[proj]}.weight"
        a_np = a.float().numpy()
        b_np = permute_for(hf_key, b.float().numpy(), config)
        qa, qb = _qtype(quant, a_np.shape[1], f"{target} lora_a"), _qtype(quant, b_np.shape[1], f"{target} lora_b")
        writer.add_tensor(f"{target}.lora_a", encode(a_np, qa), raw_dtype=qa)
        writer.add_tensor(f"{target}.lora_b", encode(b_np, qb), raw_dtype=qb)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf_lora(source: ExportSource, out: Path, quant: str, name: str) -> list[Path]:
    file_name = lora_file_name(name, quant)
    with atomic_folder(out) as tmp:
        write_gguf_lora(source, tmp / file_name, quant, name)
    return [out / file_name]


def main() -> None:
    from adapters.export.prepare import load_source

    parser = argparse.ArgumentParser(description="Write an adapter folder as a llama.cpp LoRA GGUF.")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--quant", choices=LORA_QUANTS, default="f16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for path in export_gguf_lora(load_source(args.adapter, args.base), args.out, args.quant, args.adapter.name):
        print(path)


if __name__ == "__main__":
    main()
