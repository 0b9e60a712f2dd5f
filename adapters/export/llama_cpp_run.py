"""Run an exported GGUF in real llama.cpp (through llama-cpp-python): greedy decoding from token ids, so a
comparison with the serving engine sees exactly the same prompt tokens. Used by the export tests and by
`python -m bench.export_quality`; needs the `llama-cpp-python` package (the `export` extra).

    python -m adapters.export.llama_cpp_run exports/s/sentiment-f16.gguf --prompt "Hello" [--lora F.gguf]
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

F32 = 0  # GGML_TYPE_F32: a float32 KV cache (llama.cpp's default is f16), so f32 exports compare exactly


@dataclass
class Greedy:
    tokens: list[int]
    margins: list[float]  # top-1 minus top-2 logit at each step (how close llama.cpp was to another token)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp prints its load log on fd 2 even with verbose=False in some builds; keep test output readable."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load(model_path: str, lora_path: str | None = None, n_ctx: int = 512, threads: int | None = None):
    """A llama_cpp.Llama for greedy scoring (CPU, fixed thread count)."""
    from llama_cpp import Llama

    with _quiet_stderr():
        return Llama(model_path=model_path, lora_path=lora_path, n_ctx=n_ctx, n_batch=n_ctx, verbose=False,
                     n_threads=threads or 1, seed=0, n_gpu_layers=0,
                     type_k=F32, type_v=F32)  # fmt: skip


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token (llama-cpp-python keeps `scores` only with logits_all=True)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float64)


def greedy(llm, prompt: Sequence[int], max_tokens: int, stop_ids: set[int] | None = None) -> Greedy:
    """Argmax decoding of `max_tokens` tokens (fewer if a `stop_ids` token comes; it is not included)."""
    llm.reset()
    llm.eval(list(prompt))
    tokens: list[int] = []
    margins: list[float] = []
    for _ in range(max_tokens):
        logits = last_logits(llm)
        top2 = np.partition(logits, -2)[-2:]
        token = int(np.argmax(logits))
        margins.append(float(top2[1] - top2[0]))
        if stop_ids and token in stop_ids:
            break
        tokens.append(token)
        llm.eval([token])
    return Greedy(tokens, margins)


def main() -> None:
    parser = argparse.ArgumentParser(description="Greedy-decode a prompt with a GGUF in llama.cpp.")
    parser.add_argument("model")
    parser.add_argument("--lora", default=None)
    parser.add_argument("--prompt", default="Hello")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    llm = load(args.model, args.lora)
    ids = llm.tokenize(args.prompt.encode(), add_bos=False, special=True)
    out = greedy(llm, ids, args.max_tokens, {llm.token_eos()})
    print(llm.detokenize(out.tokens).decode(errors="replace"))


if __name__ == "__main__":
    main()
