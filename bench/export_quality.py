"""Export quality benchmark: a trained adapter exported to GGUF (f16, q8_0, q4_0, and f16 base + f16 LoRA GGUF),
run in real llama.cpp (llama-cpp-python) on every row of a bundled task's eval split, against the serving engine.

For each variant: size on disk, task score, rows whose answer equals the engine's answer, and llama.cpp decode
tokens/s at batch 1 on this CPU (`--threads`). Prompts are the engine's token ids (the same chat template and
tokenizer), answers are decoded greedily up to the same budget as `jobs.evaluate` (longest reference + 8) and
stop at the same EOS ids. Targets (issue 21): q8_0 within 2 points of the engine, q4_0 within 6.

    python -m jobs.train_loop --config jobs/configs/cpu-smollm2.yaml --task sentiment --out /tmp/sentiment
    python -m bench.export_quality --adapter /tmp/sentiment/adapter --task sentiment --json bench-export.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("f16", "q8_0", "q4_0", "f16+lora")
TARGETS = {"q8_0": 2.0, "q4_0": 6.0}


def _export(adapter: Path, base: str, variant: str, work: Path) -> tuple[Path, Path | None, int]:
    """Write the variant's files; (model GGUF, LoRA GGUF or None, bytes on disk of what a user copies)."""
    from adapters.export.gguf_lora import export_gguf_lora
    from adapters.export.gguf_model import export_gguf
    from adapters.export.prepare import base_source, load_source

    if variant == "f16+lora":
        model = export_gguf(base_source(base), work / "base-f16", "f16", "base")[0]
        lora = export_gguf_lora(load_source(adapter, base), work / "lora-f16", "f16", "adapter")[0]
        return model, lora, model.stat().st_size + lora.stat().st_size
    model = export_gguf(load_source(adapter, base), work / variant, variant, "adapter")[0]
    return model, None, model.stat().st_size


def run(adapter: Path, config_path: str, task_name: str, limit: int | None, threads: int, work: Path,
        variants: list[str]) -> dict[str, Any]:  # fmt: skip
    from adapters.base_models import load_base
    from adapters.export.llama_cpp_run import greedy, load
    from jobs.config import load_config
    from jobs.data import eval_prompt_ids
    from jobs.evaluate import auto_max_new_tokens, evaluate
    from jobs.metrics import score_split
    from jobs.task_data import load_task

    config = load_config(config_path)
    task = config.task_configs()[task_name]
    examples = load_task(task_name, task).eval[: limit or None]
    base_ref = config.base_model
    base = load_base(base_ref, dtype="float32")
    tok = base.tokenizer
    budget = auto_max_new_tokens(tok, examples)
    prompts = [eval_prompt_ids(tok, ex) for ex in examples]
    references = [ex.reference for ex in examples]
    started = time.monotonic()
    engine = evaluate(base, examples, task.metric, {"adapter": adapter}, max_new_tokens=budget, batch_size=50)
    engine = engine["adapter"]
    engine_s = time.monotonic() - started
    gen_eos = base.model.generation_config.eos_token_id
    stop_ids = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    report: dict[str, Any] = {"task": task_name, "rows": len(examples), "budget": budget, "threads": threads,
                              "engine": {"score": engine.score, "seconds": round(engine_s, 1)}, "variants": {}}  # fmt: skip
    for variant in variants:
        model, lora, size = _export(adapter, base_ref, variant, work)
        llm = load(str(model), str(lora) if lora else None, n_ctx=max(map(len, prompts)) + budget + 8, threads=threads)
        predictions, new_tokens, decode_s, same = [], 0, 0.0, 0
        for ids, expected in zip(prompts, engine.predictions, strict=True):
            t0 = time.perf_counter()
            out = greedy(llm, ids, budget, stop_ids)
            decode_s += time.perf_counter() - t0
            new_tokens += len(out.tokens) + 1
            text = tok.decode(out.tokens, skip_special_tokens=True).strip()
            predictions.append(text)
            same += text == expected
        score = score_split(task.metric, predictions, references).score
        report["variants"][variant] = {
            "size_mb": round(size / 1e6, 1),
            "score": round(score, 1),
            "delta": round(score - engine.score, 1),
            "same_answer_as_engine": f"{same}/{len(examples)}",
            "tokens_per_s": round(new_tokens / decode_s, 1),
            "target_met": None if variant not in TARGETS else engine.score - score <= TARGETS[variant],
        }
        print(variant, report["variants"][variant], flush=True)
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"engine (fp32, batched): score {report['engine']['score']:.1f} on {report['rows']} rows of "
             f"{report['task']}", "", "| export | size on disk | score | vs engine | same answer | tokens/s (llama.cpp, "
             f"{report['threads']} threads, prompt included) |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, v in report["variants"].items():
        lines.append(f"| {name} | {v['size_mb']} MB | {v['score']:.1f} | {v['delta']:+.1f} | "
                     f"{v['same_answer_as_engine']} | {v['tokens_per_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="a trained adapter folder (PEFT files)")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--config", default="jobs/configs/cpu-smollm2.yaml", help="declares the task and base")
    parser.add_argument("--limit", type=int, default=None, help="eval rows (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--strict", action="store_true", help="exit 1 if q8_0 / q4_0 miss their targets")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)} (known: {', '.join(VARIANTS)})")
    with tempfile.TemporaryDirectory(prefix="export-quality-") as work:
        report = run(args.adapter, args.config, args.task, args.limit, args.threads, Path(work), variants)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.strict and any(v["target_met"] is False for v in report["variants"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
