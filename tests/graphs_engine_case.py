"""The static decode step of serve_app/engine/decode_graphs.py on the Triton kernels (paged decode attention over
the static block tables, BGMV LoRA over the static slot tensor: what a CUDA graph captures) against the eager engine
on the same kernels, on the tiny random Llama: mixed adapters, three rows padded to four, one finishing early.
Prints one JSON line with both runs' tokens and the static run's (live rows, ladder size) per decode step. Run in a
subprocess (tests/test_engine_graphs.py): on CPU the kernels need TRITON_INTERPRET=1 set before triton is imported.

    TRITON_INTERPRET=1 python tests/graphs_engine_case.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def _record_sizes(static: Any, sizes: list[tuple[int, int]]) -> None:
    """Append (live rows, ladder size) of every static decode step to `sizes`."""
    real = static.run

    def recording(rows: list[Any]) -> Any:
        logits = real(rows)
        sizes.append((len(rows), static.last_size))
        return logits

    static.run = recording


def run() -> dict[str, object]:
    from adapters.base_models import load_base
    from adapters.lora_files import BaseShapes
    from adapters.random_adapter import write_random_adapter
    from serve_app.engine import EngineConfig, LoraEngine, SamplingParams

    base = load_base("tiny-llama", device="cpu", dtype="float32")
    shapes = BaseShapes.from_config(base.model.config, base.fingerprint, base.name)
    prompts = [base.tokenizer(t).input_ids for t in ("hello there", "a longer prompt about cats and dogs", "x y z")]
    tokens: dict[str, list[list[int]]] = {}
    sizes: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {n: write_random_adapter(Path(tmp) / n, shapes, rank=4, seed=s) for n, s in (("a", 1), ("b", 2))}
        for mode in ("off", "static_eager"):
            engine = LoraEngine(base, EngineConfig(device="cpu", dtype="float32", max_running=4, max_seq_len=64,
                                                   lora_overlap="off", lora_kernel="triton", decode_attention="triton",
                                                   cuda_graphs=mode))  # fmt: skip
            for name, folder in dirs.items():
                engine.register_adapter(name, folder)
            if engine.static_decode is not None:
                _record_sizes(engine.static_decode, sizes)
            for i, (ids, adapter) in enumerate(zip(prompts, ("a", None, "b"), strict=True)):
                engine.add_request(str(i), ids, SamplingParams(max_tokens=5 - 2 * (i == 1), ignore_eos=True), adapter)
            out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
            while engine.has_work():
                for o in engine.step():
                    out[o.request_id].append(o.token_id)
            tokens[mode] = [out[str(i)] for i in range(len(prompts))]
    return {"tokens": tokens, "sizes": sizes}


def main() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    print(json.dumps(run()))


if __name__ == "__main__":
    main()
