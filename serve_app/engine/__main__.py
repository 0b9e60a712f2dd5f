"""Run a few prompts through the engine, without Ray: base model and any PEFT LoRA adapters side by side.
Each prompt goes to the base and to every adapter given, all in one continuous batch:

    python -m serve_app.engine --base tiny-llama --prompt "hello"
    python -m serve_app.engine --base smollm2-135m --adapter mine=/path/to/adapter --prompt "Classify: great!"
"""

from __future__ import annotations

import argparse
import logging

from serve_app.engine.engine import LoraEngine
from serve_app.engine.sequence import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a few prompts through the engine (no Ray).")
    parser.add_argument("--base", default="tiny-llama")
    parser.add_argument("--adapter", action="append", default=[], help="name=folder of a PEFT LoRA adapter")
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    engine = LoraEngine.from_base_ref(args.base)
    names: list[str | None] = [None]
    for spec in args.adapter:
        name, folder = spec.split("=", 1)
        engine.register_adapter(name, folder)
        names.append(name)
    prompts = args.prompt or ["Hello!"]
    texts: dict[str, str] = {}
    for i, (prompt, name) in enumerate((p, n) for p in prompts for n in names):
        chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True)  # fmt: skip
        ids = engine.tokenizer(chat, add_special_tokens=False).input_ids
        engine.add_request(f"{i}:{name or 'base'}:{prompt}", ids, SamplingParams(max_tokens=args.max_tokens), name)
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
    for key, text in texts.items():
        print(f"{key}\n  -> {text!r}")


if __name__ == "__main__":
    main()
