"""Score a task's eval split for the base model and any number of adapters — in one mixed batch through the
serving engine (the same code path, and the same batched-LoRA operator, that serves them).

    python -m jobs.evaluate --task sentiment --base smollm2-135m --adapter mine=/path/to/adapter --limit 50
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.base_models import LoadedBase, load_base
from jobs.data import prompt_text
from jobs.tasks import Task, get_task, load_split
from serve_app.engine import EngineConfig, LoraEngine, SamplingParams

BASE = "base"


@dataclass
class EvalResult:
    score: float  # 0-100, the task metric averaged over rows
    predictions: list[str] = field(repr=False)
    seconds: float = 0.0


def score_predictions(task: Task, rows: list[dict], predictions: list[str]) -> float:
    return 100.0 * sum(task.score(p, r["output"]) for p, r in zip(predictions, rows, strict=True)) / max(1, len(rows))


def auto_max_new_tokens(tokenizer: Any, rows: list[dict], margin: int = 8) -> int:
    """Enough new tokens for the longest reference answer plus `margin`. Base and adapters get the same budget;
    without a cap a base model that rambles costs the full budget on every row."""
    return margin + max(len(tokenizer(r["output"], add_special_tokens=False).input_ids) for r in rows)


def evaluate(base: LoadedBase, task: Task, rows: list[dict], adapters: dict[str, Path | None],
             max_new_tokens: int | None = None, batch_size: int = 32, max_rank: int = 64) -> dict[str, EvalResult]:  # fmt: skip
    """Greedy-decode every row for every entry of `adapters` (None = the base model) and score it.
    `max_new_tokens=None` stops each answer at `auto_max_new_tokens` (the longest reference plus a margin)."""
    tok = base.tokenizer
    prompts = [tok(prompt_text(tok, task.messages(r)), add_special_tokens=False).input_ids for r in rows]
    max_new_tokens = max_new_tokens or auto_max_new_tokens(tok, rows)
    config = EngineConfig(
        device=str(next(base.model.parameters()).device),
        dtype=str(base.model.dtype).removeprefix("torch."),  # type: ignore[arg-type]
        max_running=batch_size,
        max_seq_len=max(len(p) for p in prompts) + max_new_tokens,
        max_loras=max(1, sum(v is not None for v in adapters.values())),
        max_lora_rank=max_rank,
        prefill_chunk=512,
        max_queue=len(prompts) * len(adapters) + 1,
    )
    engine = LoraEngine(base, config)
    for name, folder in adapters.items():
        if folder is not None:
            engine.register_adapter(name, folder)
    texts: dict[tuple[str, int], str] = {}
    started = time.monotonic()
    for name, folder in adapters.items():
        for i, ids in enumerate(prompts):
            engine.add_request(f"{name}\x00{i}", ids, SamplingParams(max_tokens=max_new_tokens),
                               name if folder is not None else None)  # fmt: skip
    while engine.has_work():
        for out in engine.step():
            name, index = out.request_id.split("\x00")
            texts[(name, int(index))] = texts.get((name, int(index)), "") + out.text
    seconds = time.monotonic() - started
    results = {}
    for name in adapters:
        predictions = [texts.get((name, i), "").strip() for i in range(len(rows))]
        results[name] = EvalResult(score_predictions(task, rows, predictions), predictions, seconds)
    return results


@contextlib.contextmanager
def as_base(peft_model: Any, base: LoadedBase):
    """The PEFT-wrapped model seen as its plain base (LoRA layers bypassed, eval mode), for `evaluate`."""
    was_training = peft_model.training
    peft_model.eval()
    with peft_model.disable_adapter():
        yield LoadedBase(base.name, base.path, peft_model.get_base_model(), base.tokenizer, base.quantized,
                         base.fingerprint)  # fmt: skip
    peft_model.train(was_training)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--adapter", action="append", default=[], help="name=folder (a PEFT LoRA adapter)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 8 tokens")
    args = parser.parse_args()
    task = get_task(args.task)
    rows = load_split(args.task, "eval")[: args.limit]
    adapters: dict[str, Path | None] = {BASE: None}
    adapters.update({n: Path(f) for n, f in (spec.split("=", 1) for spec in args.adapter)})
    results = evaluate(load_base(args.base), task, rows, adapters, args.max_new_tokens)
    for name, result in results.items():
        print(f"{name:24s} {task.metric}={result.score:6.1f}  ({len(rows)} rows, {result.seconds:.0f}s)")


if __name__ == "__main__":
    main()
