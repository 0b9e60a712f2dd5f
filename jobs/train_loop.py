"""The training loop for one adapter, in plain Python (no Ray): usable on a laptop and inside a Ray Train worker.

    python -m jobs.train_loop --config jobs/configs/cpu-smollm2.yaml --task sentiment --out /tmp/sentiment

Each optimizer step accumulates `grad_accum` micro-batches and normalises the loss by the number of completion
tokens in the step, counted over all DDP ranks (N workers step like one accumulating the same rows). Every
`log_every` steps it reports loss / lr / tokens per second / memory through `hooks.log`;
every `eval_every` steps a quick eval (eval loss and the task metric on a few eval rows, decoded by the serving
engine); every `checkpoint_every` steps a checkpoint through `hooks.checkpoint`. A run given a checkpoint resumes
at its step with the same data order. At the end the adapter is written in the served format and the base model
and the adapter are scored on the eval split in one mixed batch.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from jobs.checkpointing import load_checkpoint, save_adapter, save_checkpoint
from jobs.config import TrialSpec, load_config
from jobs.data import Batches, collate
from jobs.early_stop import EarlyStop
from jobs.evaluate import BASE, as_base, evaluate
from jobs.model_setup import build_training, eval_base
from jobs.task_runtime import PreparedTask, prepare_task
from jobs.training_length import epochs_seen

log = logging.getLogger(__name__)


class Hooks(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def checkpoint(self, step: int, folder: Path | None, metrics: dict[str, float]) -> None: ...


class PrintHooks:
    """Hooks for a run outside Ray: print metric lines, keep the latest checkpoint folder."""

    def __init__(self) -> None:
        self.last_checkpoint: Path | None = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        print(f"step {step:5d} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

    def checkpoint(self, step: int, folder: Path | None, metrics: dict[str, float]) -> None:
        self.last_checkpoint = folder


@dataclass
class TrainOutcome:
    adapter_dir: Path
    steps: int
    train_loss: float
    tokens_per_s: float
    train_seconds: float
    peak_memory_mb: float
    base_score: float
    adapter_score: float
    examples: list[dict[str, str]] = field(default_factory=list)  # a few (input, expected, base, adapter)
    epochs: float = float("nan")  # passes over the training split
    details: dict[str, float] = field(default_factory=dict)  # the metric's other numbers (adapter_<k>, base_<k>)
    prompt_format: dict[str, Any] = field(default_factory=dict)  # what it was trained with (adapters/prompt_format)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the completion tokens, and their count. The LM head (a vocab-sized
    matmul plus softmax per position) runs only at positions that predict a completion token: with left-padded
    batches those are the last few columns, which saves a fifth of a small model's step."""
    labels = batch["labels"][:, 1:]
    wanted = (labels != -100).any(dim=0).nonzero().flatten()  # positions p whose logits predict token p+1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=wanted).logits
    targets = labels[:, wanted]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")  # fmt: skip
    return loss, int((targets != -100).sum())


def to_device(batch: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {k: v.to(device) for k, v in batch.items()}
    if out["attention_mask"].dim() == 4:
        out["attention_mask"] = out["attention_mask"].to(dtype)
    return out


def train(
    spec: TrialSpec,
    hooks: Hooks,
    out_dir: Path,
    resume: Path | None = None,
    rank: int = 0,
    world: int = 1,
    device: str | None = None,
    wrap_model: Any = None,
    final_eval: bool = True,
) -> TrainOutcome:
    """Train one adapter; only rank 0 writes files and evaluates (unless `final_eval` is False: benchmarks).
    `wrap_model` wraps for DDP (Ray Train)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t = spec.training

    from transformers import AutoTokenizer

    from adapters.base_models import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(spec.base_model).path)  # the data decides the step count
    task = prepare_task(spec, tokenizer)
    eval_rows = task.eval
    batches = Batches(task.train, t.micro_batch_size, t.max_seq_len, t.packing, t.seed, rank, world)
    setup = build_training(spec, device, batches.per_epoch, world)
    model, base = setup.model, setup.base
    ds = setup.deepspeed_engine
    forward_model = ds or (wrap_model(model) if wrap_model else model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    compute_dtype = next(p for p in model.parameters() if p.dtype.is_floating_point).dtype

    step, micro_index = 0, 0
    stopper = EarlyStop(t.early_stop_patience)
    if resume is not None:
        progress = load_checkpoint(resume, model, setup.optimizer, setup.scheduler, ds)
        step, micro_index = progress["step"], progress["micro_index"]
        stopper.restore(progress)
        log.info("resumed %s from step %d", spec.adapter_name, step)
        hooks.log(step, {"resumed_from_step": step})  # in the run's metrics: a retried run shows where it resumed

    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    window_loss, window_tokens, window_count, window_start = 0.0, 0, 0, time.monotonic()
    started, seen_tokens, last_loss = time.monotonic(), 0, float("nan")
    while step < setup.total_steps:
        loss_total, target_total, micro = torch.zeros(()), 0, []
        for _ in range(t.grad_accum):
            micro.append(batches.at(micro_index))
            micro_index += 1
        targets = sum(sum(lb != -100 for lb in ex.labels) for mb in micro for row in mb for ex in row)
        # DDP/DeepSpeed average the ranks' gradients: scale by world / (tokens of the whole step, all ranks), so
        # N workers take the same step as one worker accumulating the same rows
        step_targets = _step_tokens(targets, world, device)
        for mb in micro:
            batch = to_device(collate(mb, pad_id, compute_dtype), device, compute_dtype)
            with setup.forward_context():  # bf16 autocast on CUDA (jobs/precision.py), nothing on CPU
                summed, count = loss_sum(forward_model, batch)
            loss = summed * world / max(step_targets, 1)
            if ds is not None:  # DeepSpeed steps per micro-batch and applies the update at the accumulation boundary
                ds.backward(loss, scale_wrt_gas=False)  # the loss is already normalised over the whole window
                ds.step()
            else:
                loss.backward()
            loss_total += summed.detach().float().cpu()
            target_total += count
            seen_tokens += int((batch["input_ids"] != pad_id).sum())
        if ds is None:
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
            setup.optimizer.step()
            setup.scheduler.step()
            setup.optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = float(loss_total) / max(target_total, 1)
        window_loss += last_loss
        window_count += 1
        window_tokens += sum(len(ex.input_ids) for mb in micro for row in mb for ex in row)
        if step % t.log_every == 0 or step == setup.total_steps:
            elapsed = time.monotonic() - window_start
            hooks.log(step, {"loss": window_loss / window_count, "lr": setup.scheduler.get_last_lr()[0],
                             "tokens_per_s": window_tokens * world / max(elapsed, 1e-9),
                             "memory_mb": peak_memory_mb(device), "epoch": micro_index / max(batches.per_epoch, 1)})  # fmt: skip
            window_loss, window_tokens, window_count, window_start = 0.0, 0, 0, time.monotonic()
        if t.eval_every and step % t.eval_every == 0 and step < setup.total_steps:
            stop = False
            if rank == 0:
                quick = quick_eval(spec, task, model, base, eval_rows[: spec.evaluation.quick_examples], pad_id)
                stop = stopper.update(quick["eval_loss"])
                hooks.log(step, {**quick, **({"early_stopped_at": step} if stop else {})})
            if _agreed(stop, world, device):
                break
        if step % t.checkpoint_every == 0 and step < setup.total_steps:
            with tempfile.TemporaryDirectory() as tmp:
                folder = save_checkpoint(Path(tmp) / "checkpoint", model, setup.optimizer, setup.scheduler, step,
                                         micro_index, base.name, base.fingerprint, stopper.state(), rank, ds)  # fmt: skip
                hooks.checkpoint(step, folder, {"step": step, "loss": last_loss})
    train_seconds = time.monotonic() - started
    outcome = TrainOutcome(out_dir, step, last_loss, seen_tokens * world / max(train_seconds, 1e-9), train_seconds,
                           peak_memory_mb(device), float("nan"), float("nan"))  # fmt: skip
    outcome.epochs = epochs_seen(step, t.micro_batch_size, t.grad_accum, world, len(batches.units) * world)
    save_adapter(model, out_dir, base.name, base.fingerprint, rank)  # every rank: gathered under ZeRO-3
    outcome.prompt_format = task.prompt_format().model_dump()
    if rank == 0:
        task.prompt_format().write(out_dir)
    if rank == 0 and final_eval:
        final_scores(outcome, model, base, setup, task, spec, out_dir, pad_id)
    return outcome


def final_scores(outcome: TrainOutcome, model: Any, base: Any, setup: Any, task: PreparedTask, spec: TrialSpec,
                 out_dir: Path, pad_id: int) -> None:  # fmt: skip
    """Base and adapter scored on the eval split: decoded in one mixed batch (or, for `eval_loss`, their loss)."""
    if not task.metric.generates:
        with as_base(model, base) as plain:
            outcome.base_score = eval_loss(plain.model, base.tokenizer, task, pad_id, spec.evaluation.batch_size)
        outcome.adapter_score = eval_loss(model, base.tokenizer, task, pad_id, spec.evaluation.batch_size)
        return
    with eval_base(setup, as_base(model, base)) as plain:  # ZeRO-3: a fresh unsharded base
        results = evaluate(plain, task.eval, task.metric, {BASE: None, "adapter": out_dir},
                           spec.evaluation.max_new_tokens, spec.evaluation.batch_size, spec.lora.r)  # fmt: skip
    outcome.base_score, outcome.adapter_score = results[BASE].score, results["adapter"].score
    outcome.details = {**{f"base_{k}": v for k, v in results[BASE].details.items()},
                       **{f"adapter_{k}": v for k, v in results["adapter"].details.items()}}  # fmt: skip
    outcome.examples = [{"input": example_input(ex), "expected": ex.reference, "base": b, "adapter": a}
                        for ex, b, a in zip(task.eval[:5], results[BASE].predictions,
                                            results["adapter"].predictions, strict=False)]  # fmt: skip


def example_input(example: Any) -> str:
    """What the model was asked, for a human: the last user turn, or the raw prompt."""
    users = [m["content"] for m in example.messages if m.get("role") == "user"]
    return str(users[-1]) if users else example.prompt


@torch.no_grad()
def eval_loss(model: Any, tokenizer: Any, task: PreparedTask, pad_id: int, batch_size: int) -> float:
    """Mean next-token loss over the eval split's trained-on tokens (what metric `eval_loss` reports)."""
    was_training = model.training
    model.eval()
    dtype = next(p for p in model.parameters() if p.dtype.is_floating_point).dtype
    device = str(next(model.parameters()).device)
    encoded = task.encode(tokenizer, task.eval)
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = to_device(collate([[e] for e in encoded[i : i + batch_size]], pad_id, dtype), device, dtype)
        summed, n = loss_sum(model, batch)
        total, count = total + float(summed), count + n
    model.train(was_training)
    return total / max(count, 1)


def _step_tokens(targets: int, world: int, device: str) -> int:
    """The completion tokens of this optimizer step summed over all ranks."""
    if world == 1:
        return targets
    count = torch.tensor([targets], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(count)
    return int(count.item())


def _agreed(stop: bool, world: int, device: str) -> bool:
    """Rank 0's early-stop decision, on every rank."""
    if world == 1:
        return stop
    flag = torch.tensor([int(stop)], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def quick_eval(spec: TrialSpec, task: PreparedTask, model: Any, base: Any, rows: list[Any],
               pad_id: int) -> dict[str, float]:  # fmt: skip
    """Eval loss and task metric on a few eval rows, mid-training."""
    examples = task.encode(base.tokenizer, rows)
    dtype = next(p for p in model.parameters() if p.dtype.is_floating_point).dtype
    device = str(next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        summed, count = loss_sum(model, to_device(collate([[e] for e in examples], pad_id, dtype), device, dtype))
    model.train()
    loss = float(summed) / max(count, 1)
    if not task.metric.generates:
        return {"eval_loss": loss}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(model, Path(tmp) / "adapter", base.name, base.fingerprint)
        with as_base(model, base) as plain:
            result = evaluate(plain, rows, task.metric, {"adapter": folder}, spec.evaluation.max_new_tokens,
                              spec.evaluation.batch_size, spec.lora.r)["adapter"]  # fmt: skip
    return {"eval_loss": loss, f"eval_{task.metric_label}": result.score}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    config = load_config(args.config)
    spec = next(s for s in config.trials() if s.task == args.task)
    if args.max_steps:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"max_steps": args.max_steps})})
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    outcome = train(spec, PrintHooks(), args.out)
    print(f"{spec.adapter_name}: base {outcome.base_score:.1f} -> adapter {outcome.adapter_score:.1f} "
          f"({outcome.steps} steps, {outcome.train_seconds:.0f}s, {outcome.tokens_per_s:.0f} tok/s)")  # fmt: skip


if __name__ == "__main__":
    main()
