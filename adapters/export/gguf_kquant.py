"""K-quants for the `gguf` export (q4_k_m), made by llama.cpp's own quantizer: the `gguf` package can read K-quant
blocks but has no K-quant quantizer, so the writer produces an f32 GGUF and `llama_model_quantize` (llama.cpp's C
API, shipped by llama-cpp-python, the `export` extra) turns it into Q4_K_M exactly as `llama-quantize` would: its
per-tensor mix (Q6_K for the output layer and part of attn_v / ffn_down, Q4_K elsewhere) and its fallbacks for
rows that are not a multiple of 256 (Q4_K -> Q5_0, Q6_K -> Q8_0; SmolLM2-135M's 576-wide rows take them).

    python -m adapters.export.gguf_kquant model-f32.gguf model-q4_k_m.gguf --quant q4_k_m
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapters.export.prepare import ExportRefused

# --quant name -> llama.cpp's llama_ftype constant (in llama_cpp)
LLAMA_CPP_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


@contextlib.contextmanager
def _collected_log(llama_cpp: Any) -> Iterator[list[str]]:
    """Collect llama.cpp's log lines (a line per tensor while quantizing; the reason when it fails) instead of
    printing them. llama-cpp-python's own callback, restored after, maps ggml's levels so that errors pass as debug
    output and are dropped, which would lose the reason."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        logger = sys.modules.get("llama_cpp._logger")
        llama_cpp.llama_log_set(getattr(logger, "llama_log_callback", None), ctypes.c_void_p(0))


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """Quantize the f32/f16 GGUF `src` into `dst` with llama.cpp (threads 0: all cores); ExportRefused on failure."""
    if quant not in LLAMA_CPP_QUANTS:
        raise ExportRefused(f"quant '{quant}' is not one of llama.cpp's quantizer types here ({LLAMA_CPP_QUANTS})")
    try:
        import llama_cpp
    except ImportError as err:
        raise ExportRefused(
            f"--quant {quant} uses llama.cpp's own quantizer: install the `export` extra (llama-cpp-python)"
        ) from err
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_QUANTS[quant])
    params.nthread = threads
    with _collected_log(llama_cpp) as log:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if code != 0:
        tail = "".join(log)[-2000:]
        raise ExportRefused(f"llama.cpp's quantizer failed to write {quant} (code {code}):\n{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Quantize a GGUF with llama.cpp's quantizer.")
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--quant", choices=sorted(LLAMA_CPP_QUANTS), default="q4_k_m")
    args = parser.parse_args()
    quantize_gguf(args.src, args.dst, args.quant)
    print(args.dst)


if __name__ == "__main__":
    main()
