"""The engine's decode attention through the Triton paged-decode kernel against its PyTorch path, on the tiny random
Llama: mixed adapters, prompts of different lengths, KV blocks few enough to preempt. Prints one JSON line with
both runs' tokens. Run in a subprocess (tests/test_engine_paged.py): on CPU the kernel needs TRITON_INTERPRET=1 set
before triton is imported (slow: keep the case small).

    TRITON_INTERPRET=1 python tests/paged_engine_case.py --device cpu
    python tests/paged_engine_case.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(device: str) -> dict[str, object]:
    from adapters.base_models import load_base
    from adapters.lora_files import BaseShapes
    from adapters.random_adapter import write_random_adapter
    from serve_app.engine import EngineConfig, LoraEngine, SamplingParams

    base = load_base("tiny-llama", device=device, dtype="float32")
    shapes = BaseShapes.from_config(base.model.config, base.fingerprint, base.name)
    prompts = [base.tokenizer(t).input_ids for t in ("hello there", "a somewhat longer prompt about cats and dogs",
                                                     "x y " * 13)]  # fmt: skip
    tokens: dict[str, list[list[int]]] = {}
    preemptions: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {n: write_random_adapter(Path(tmp) / n, shapes, rank=4, seed=s) for n, s in (("a", 1), ("b", 2))}
        for attention in ("torch", "triton"):
            engine = LoraEngine(base, EngineConfig(device=device, dtype="float32", max_running=3, max_seq_len=64,
                                                   num_kv_blocks=4, lora_overlap="off", lora_kernel="gather",
                                                   decode_attention=attention))  # fmt: skip
            for name, folder in dirs.items():
                engine.register_adapter(name, folder)
            for i, (ids, adapter) in enumerate(zip(prompts, ("a", None, "b"), strict=True)):
                engine.add_request(str(i), ids, SamplingParams(max_tokens=6, ignore_eos=True), adapter)
            out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
            while engine.has_work():
                for o in engine.step():
                    out[o.request_id].append(o.token_id)
            tokens[attention] = [out[str(i)] for i in range(len(prompts))]
            preemptions[attention] = engine.preemptions
            assert engine.kv.num_free == engine.kv.num_blocks
    return {"tokens": tokens, "preemptions": preemptions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    print(json.dumps(run(args.device)))


if __name__ == "__main__":
    main()
