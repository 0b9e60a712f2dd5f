"""Export format `gguf`: the base with the adapter merged in, as one llama.cpp GGUF file (f32, f16, q8_0, q4_0 or
q4_k_m) with the tokenizer and chat template in its metadata, and an Ollama `Modelfile` next to it.

    lorafleet export sentiment --format gguf --quant q4_0 --out exports/sentiment-q4
    ollama create sentiment -f exports/sentiment-q4/Modelfile      # or: llama-cli -m exports/.../*.gguf

q8_0 and q4_0 are quantized by the `gguf` package's reference quantizers (the same block formats llama.cpp reads).
For q4_0 the token embedding (the output layer too when tied) stays at q8_0, as llama.cpp's quantizer keeps it
above 4 bits. q4_k_m: the `gguf` package has no K-quant quantizer, so an f32 GGUF is written first (a hidden file
in the same temporary folder) and llama.cpp's own quantizer makes the Q4_K_M file from it
(adapters/export/gguf_kquant.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapters.export.gguf_kquant import LLAMA_CPP_QUANTS, quantize_gguf
from adapters.export.gguf_llama import (
    QUANTS,
    add_hparams,
    add_tokenizer,
    encode,
    gguf_name,
    permute_for,
    tensor_type,
)
from adapters.export.ollama import write_modelfile
from adapters.export.prepare import (
    ExportRefused,
    ExportSource,
    atomic_folder,
    check_base_for_llama_cpp,
    merged_state_dict,
)

FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE values
GGUF_QUANTS = (*QUANTS, *LLAMA_CPP_QUANTS)  # written here, or (K-quants) by llama.cpp's quantizer


def gguf_file_name(name: str, quant: str) -> str:
    return f"{name}-{quant}.gguf"


def write_gguf(source: ExportSource, path: Path, quant: str, name: str) -> None:
    """Write the merged model to `path` (a file inside a folder that `atomic_folder` renames at the end)."""
    import gguf

    if quant not in QUANTS:
        raise ValueError(f"quant '{quant}' is not one of {QUANTS}")
    config = source.base.model.config
    check_base_for_llama_cpp(config)
    state = merged_state_dict(source)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp uses token_embd when output.weight is absent
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[quant])
    if quant in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, config)
    add_tokenizer(writer, Path(source.base.path), source.base.name, source.base.tokenizer, config.vocab_size)
    for key in sorted(state):
        array = permute_for(key, state[key].float().numpy(), config)
        target = gguf_name(key)
        qtype = tensor_type(target, array, quant)
        writer.add_tensor(target, encode(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(source: ExportSource, out: Path, quant: str, name: str) -> list[Path]:
    """Write `<name>-<quant>.gguf` and `Modelfile` into the new folder `out`; the files written."""
    if quant not in GGUF_QUANTS:
        raise ExportRefused(f"quant '{quant}' is not supported for gguf (supported: {', '.join(GGUF_QUANTS)})")
    file_name = gguf_file_name(name, quant)
    with atomic_folder(out) as tmp:
        if quant in LLAMA_CPP_QUANTS:
            staging = tmp / f".{name}-f32.gguf"
            write_gguf(source, staging, "f32", name)
            quantize_gguf(staging, tmp / file_name, quant)
            staging.unlink()
        else:
            write_gguf(source, tmp / file_name, quant, name)
        write_modelfile(tmp / "Modelfile", file_name, source.prompt, source.base.tokenizer)
    return [out / file_name, out / "Modelfile"]


def main() -> None:
    from adapters.export.prepare import load_source

    parser = argparse.ArgumentParser(description="Merge an adapter folder into its base and write a GGUF file.")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--quant", choices=GGUF_QUANTS, default="f16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for path in export_gguf(load_source(args.adapter, args.base), args.out, args.quant, args.adapter.name):
        print(path)


if __name__ == "__main__":
    main()
