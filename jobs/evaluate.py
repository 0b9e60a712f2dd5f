"""Score a task's eval split for the base model and any number of adapters — in one mixed batch through the
serving engine (the same code path, and the same batched-LoRA operator, that serves them). Each row's prompt is
exactly what the server builds for the same request (`jobs.data.eval_prompt_ids`), so a score here is what a
client of the endpoint gets.

    python -m jobs.evaluate --config jobs/configs/cpu-smollm2.yaml --task sentiment --adapter mine=/path/to/adapter
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.base_models import LoadedBase, load_base
from jobs.data import eval_prompt_ids
from jobs.gpu_share import release_cached_memory
from jobs.metrics import score_split
from jobs.task_config import MetricConfig
from jobs.task_data import Example
from serve_app.engine import EngineConfig, LoraEngine, SamplingParams

BASE = "base"


@dataclass
class EvalResult:
    score: float  # 0-100: the task metric over the rows (its headline number)
    predictions: list[str] = field(repr=False)
    seconds: float = 0.0
    details: dict[str, float] = field(default_factory=dict)  # e.g. choice: accuracy and macro_f1


def auto_max_new_tokens(tokenizer: Any, examples: list[Example], margin: int = 8) -> int:
    """Enough new tokens for the longest reference answer plus `margin`. Base and adapters get the same budget;
    without a cap a base model that rambles costs the full budget on every row."""
    return margin + max(len(tokenizer(ex.reference, add_special_tokens=False).input_ids) for ex in examples)


def evaluate(base: LoadedBase, examples: list[Example], metric: MetricConfig, adapters: dict[str, Path | None],
             max_new_tokens: int | None = None, batch_size: int = 32, max_rank: int = 64) -> dict[str, EvalResult]:  # fmt: skip
    """Greedy-decode every example for every entry of `adapters` (None = the base model) and score it with
    `metric` (a generating metric: `eval_loss` is computed by the training loops from the loss).
    `max_new_tokens=None` stops each answer at `auto_max_new_tokens` (the longest reference plus a margin)."""
    tok = base.tokenizer
    prompts = [eval_prompt_ids(tok, ex) for ex in examples]
    max_new_tokens = max_new_tokens or auto_max_new_tokens(tok, examples)
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
    engine.close()  # its LoRA side thread stops now, not whenever the engine is collected
    del engine  # KV cache and LoRA slots freed now, and the cached blocks handed back to a shared GPU
    release_cached_memory(config.device)
    results = {}
    references = [ex.reference for ex in examples]
    for name in adapters:
        predictions = [texts.get((name, i), "").strip() for i in range(len(examples))]
        scored = score_split(metric, predictions, references)
        results[name] = EvalResult(scored.score, predictions, seconds, dict(scored.details))
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
    parser.add_argument("--config", required=True, help="a sweep config declaring the task")
    parser.add_argument("--task", required=True)
    parser.add_argument("--adapter", action="append", default=[], help="name=folder (a PEFT LoRA adapter)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 8 tokens")
    args = parser.parse_args()
    from jobs.config import load_config
    from jobs.task_data import load_task

    config = load_config(args.config)
    task = config.task_configs()[args.task]
    examples = load_task(args.task, task).eval[: args.limit]
    adapters: dict[str, Path | None] = {BASE: None}
    adapters.update({n: Path(f) for n, f in (spec.split("=", 1) for spec in args.adapter)})
    results = evaluate(load_base(config.base_model), examples, task.metric, adapters, args.max_new_tokens)
    for name, result in results.items():
        print(f"{name:24s} {task.metric.name}={result.score:6.1f}  ({len(examples)} rows, {result.seconds:.0f}s)")


if __name__ == "__main__":
    main()
