"""Co-training: K adapters trained together over one frozen base copy, in plain Python (no Ray).

    python -m jobs.cotrain_loop --config jobs/configs/cpu-smollm2-cotrain.yaml --out /tmp/cotrain [--max-steps 10]

Each round, every adapter still training contributes its next micro-batch (the very micro-batch its solo run
would take: same `Batches` order and seed); the rows go through the base model in one forward, where every
targeted linear layer adds the batched-LoRA delta of each row's own adapter (`adapters.trainable_lora`). The loss
is the sum over adapters of each one's solo loss (its completion tokens' cross-entropy over its own step's token
count), so each adapter's gradient is exactly its solo gradient. Each adapter then does its own thing: its own
AdamW, LR schedule, gradient clipping, gradient accumulation, step count, quick evals and early stop. An adapter
that finishes or stops leaves the batch; the others go on. With dropout 0 a co-trained adapter equals its solo
run up to float rounding (tests/test_cotrain.py); dropout masks come from another random stream than PEFT's.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import torch

from adapters.trainable_lora import AdapterShape, TrainableLoraBank
from jobs.config import TrialSpec, load_config
from jobs.cotrain_state import Member, load_group_checkpoint, save_group_checkpoint
from jobs.data import collate
from jobs.evaluate import BASE, evaluate
from jobs.model_setup import make_optimizer, make_scheduler, prepare_for_lora, total_steps
from jobs.precision import enable_tf32, training_autocast
from jobs.task_runtime import prepare_task
from jobs.train_loop import TrainOutcome, example_input, peak_memory_mb, to_device
from jobs.training_length import epochs_seen

log = logging.getLogger(__name__)


class GroupHooks(Protocol):
    def log(self, adapter: str, step: int, metrics: dict[str, float]) -> None: ...
    def checkpoint(self, round_index: int, folder: Path | None, metrics: dict[str, float]) -> None: ...


class PrintGroupHooks:
    def __init__(self) -> None:
        self.last_checkpoint: Path | None = None

    def log(self, adapter: str, step: int, metrics: dict[str, float]) -> None:
        print(f"[{adapter}] step {step:5d} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

    def checkpoint(self, round_index: int, folder: Path | None, metrics: dict[str, float]) -> None:
        self.last_checkpoint = folder


def check_group(specs: list[TrialSpec]) -> None:
    """Adapters co-train only over one identical base: same model, quantization and gradient checkpointing."""
    first = specs[0]
    names = [s.adapter_name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"co-trained adapters need distinct names: {names}")
    for spec in specs[1:]:
        for field in ("base_model", "quantization"):
            if getattr(spec, field) != getattr(first, field):
                raise ValueError(f"{spec.adapter_name}: {field} differs from {first.adapter_name}'s; cannot co-train")
        if spec.training.gradient_checkpointing != first.training.gradient_checkpointing:
            raise ValueError(f"{spec.adapter_name}: training.gradient_checkpointing differs; cannot co-train")


def prepare_base(spec: TrialSpec, device: str) -> Any:
    """Load the frozen base once, ready for LoRA training."""
    from adapters.base_models import load_base

    base = load_base(spec.base_model, spec.quantization, device=device)
    for p in base.model.parameters():
        p.requires_grad_(False)
    base.model = prepare_for_lora(base, spec.training.gradient_checkpointing)
    base.model.config.use_cache = False
    return base


def row_loss_sums(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed next-token cross-entropy over its completion tokens [B], and their count [B]. Like
    `train_loop.loss_sum`, logits only at the positions that predict a completion token."""
    labels = batch["labels"][:, 1:]
    wanted = (labels != -100).any(dim=0).nonzero().flatten()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=wanted).logits
    targets = labels[:, wanted]
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                               ignore_index=-100, reduction="none").view(targets.shape)  # fmt: skip
    return losses.sum(dim=1), (targets != -100).sum(dim=1)


def cotrain(specs: list[TrialSpec], hooks: GroupHooks, out_dir: Path, resume: Path | None = None,
            device: str | None = None, final_eval: bool = True) -> dict[str, TrainOutcome]:  # fmt: skip
    """Train `specs` together; write each adapter to out_dir/<adapter_name>; return each one's outcome (scored on
    the eval split unless `final_eval` is False: benchmarks)."""
    check_group(specs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    enable_tf32(device)  # CUDA only, like a solo run (jobs/precision.py)
    autocast = specs[0].quantization.compute_dtype  # one base, one compute dtype for the whole group
    base = prepare_base(specs[0], device)
    model, tokenizer = base.model, base.tokenizer
    shapes = [AdapterShape(s.adapter_name, s.lora.r, s.lora.alpha, s.lora.dropout, tuple(s.lora.modules()),
                           s.training.seed, s.lora.use_rslora) for s in specs]  # fmt: skip
    bank = TrainableLoraBank(model, shapes, device)
    members = []
    for k, spec in enumerate(specs):
        task = prepare_task(spec, tokenizer)
        optimizer = make_optimizer(spec, bank.parameters(k))
        member = Member.build(spec, k, task, tokenizer, task.train, task.eval, optimizer)
        member.total_steps = total_steps(spec, member.batches.per_epoch)
        member.scheduler = make_scheduler(spec, optimizer, member.total_steps)
        members.append(member)
    round_index = 0
    if resume is not None:
        round_index = load_group_checkpoint(resume, bank, members)
        for m in members:
            hooks.log(m.spec.adapter_name, m.step, {"resumed_from_step": m.step})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dtype = next(p for p in model.parameters() if p.dtype.is_floating_point).dtype
    torch.manual_seed(specs[0].training.seed)  # LoRA dropout masks
    every = min(s.training.checkpoint_every for s in specs)
    last_checkpoint = round_index
    model.train()
    started = time.monotonic()
    while active := [m for m in members if not m.done]:
        rows = [(row, m) for m in active for row in m.next_micro_batch()]
        parts = {id(m): [0.0, 0, 0] for m in active}  # loss sum, completion tokens, tokens
        for chunk in length_chunks(rows):
            chunk.sort(key=lambda item: item[1].slot)  # each adapter's rows side by side: the operator's fast path
            batch = to_device(collate([row for row, _ in chunk], pad_id, dtype), device, dtype)
            bank.use(torch.tensor([m.slot for _, m in chunk], device=device), batch["input_ids"].shape[1])
            with training_autocast(device, autocast):  # bf16 autocast on CUDA, nothing on CPU
                sums, counts = row_loss_sums(model, batch)
            scale = torch.tensor([1.0 / max(m.window_targets, 1) for _, m in chunk], device=sums.device)
            (sums * scale).sum().backward()  # each adapter's own solo loss; its rows may span several chunks
            tokens = (batch["input_ids"] != pad_id).sum(dim=1).tolist()
            for (_, m), loss_sum, count, n in zip(chunk, sums.detach().tolist(), counts.tolist(), tokens, strict=True):
                part = parts[id(m)]
                part[0], part[1], part[2] = part[0] + loss_sum, part[1] + count, part[2] + n
        for m in active:
            m.record(*parts[id(m)])
        round_index += 1
        for m in active:
            if m.pending < m.spec.training.grad_accum:
                continue
            _optimizer_step(bank, m)
            metrics = m.finish_step(time.monotonic() - started)
            if metrics:
                hooks.log(m.spec.adapter_name, m.step, {**metrics, "memory_mb": peak_memory_mb(device)})
            t = m.spec.training
            if t.eval_every and m.step % t.eval_every == 0 and not m.done:
                quick = quick_eval(bank, base, m, pad_id, dtype, device)
                if m.stopper.update(quick["eval_loss"]):
                    m.stop_early(time.monotonic() - started)
                    quick["early_stopped_at"] = m.step
                hooks.log(m.spec.adapter_name, m.step, quick)
        if (
            round_index - last_checkpoint >= every
            and all(m.pending == 0 for m in members)
            and not all(m.done for m in members)
        ):
            with tempfile.TemporaryDirectory() as tmp:
                folder = save_group_checkpoint(Path(tmp) / "checkpoint", bank, members, round_index, base)
                hooks.checkpoint(round_index, folder, {"round": round_index})
            last_checkpoint = round_index
    bank.plan = None
    return finish(bank, base, members, out_dir, device, final_eval)


def length_chunks(rows: list[tuple[Any, Any]], max_padding: float = 1.15, max_chunks: int = 4,
                  min_rows: int = 8) -> list[list[tuple[Any, Any]]]:  # fmt: skip
    """Split one round's rows (longest first) into at most `max_chunks` forwards, so that padding every row to
    its chunk's longest costs at most `max_padding` x the real tokens where that is possible with chunks of at
    least `min_rows` rows: adapters with short rows are not padded to another task's long rows. Gradients add
    up over the chunks, so the split changes no result (beyond float rounding)."""
    ordered = sorted(rows, key=lambda item: -sum(len(e.input_ids) for e in item[0]))
    lengths = [sum(len(e.input_ids) for e in row) for row, _ in ordered]
    chunks: list[list[tuple[Any, Any]]] = [[]]
    real, longest = 0, 0
    for item, length in zip(ordered, lengths, strict=True):
        current = chunks[-1]
        too_padded = current and (len(current) + 1) * longest > max_padding * (real + length)
        if too_padded and len(current) >= min_rows and len(chunks) < max_chunks:
            chunks.append([])
            current, real = chunks[-1], 0
        if not current:
            longest = length
        current.append(item)
        real += length
    return chunks


def _optimizer_step(bank: TrainableLoraBank, m: Member) -> None:
    bank.link_grad(m.index)
    if m.spec.training.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(bank.parameters(m.index), m.spec.training.max_grad_norm)
    m.optimizer.step()
    m.scheduler.step()
    bank.zero_grad(m.index)


@torch.no_grad()
def _eval_loss(bank: TrainableLoraBank, model: Any, m: Member, rows: list[Any], pad_id: int,
               dtype: torch.dtype, device: str, adapter: bool = True) -> float:  # fmt: skip
    """Mean completion-token loss of `rows` with this member's adapter (or, `adapter=False`, the plain base)."""
    examples = m.task.encode(m.tokenizer, rows)
    total, count, size = 0.0, 0, m.spec.evaluation.batch_size
    for i in range(0, len(examples), size):
        batch = to_device(collate([[e] for e in examples[i : i + size]], pad_id, dtype), device, dtype)
        if adapter:
            bank.use(torch.full((batch["input_ids"].shape[0],), m.slot, device=device), batch["input_ids"].shape[1])
            sums, counts = row_loss_sums(model, batch)
        else:
            with bank.disabled():
                sums, counts = row_loss_sums(model, batch)
        total, count = total + float(sums.sum()), count + int(counts.sum())
    return total / max(count, 1)


def quick_eval(bank: TrainableLoraBank, base: Any, m: Member, pad_id: int, dtype: torch.dtype,
               device: str) -> dict[str, float]:  # fmt: skip
    """Eval loss and the task metric on a few eval rows, for one adapter, mid-training."""
    rows = m.eval_rows[: m.spec.evaluation.quick_examples]
    base.model.eval()
    try:
        eval_loss = _eval_loss(bank, base.model, m, rows, pad_id, dtype, device)
        if not m.task.metric.generates:
            return {"eval_loss": eval_loss}
        with tempfile.TemporaryDirectory() as tmp, bank.disabled():
            folder = bank.save(m.index, Path(tmp) / "adapter", base.name, base.fingerprint)
            score = evaluate(base, rows, m.task.metric, {"adapter": folder}, m.spec.evaluation.max_new_tokens,
                             m.spec.evaluation.batch_size, m.spec.lora.r)["adapter"].score  # fmt: skip
    finally:
        base.model.train()
    return {"eval_loss": eval_loss, f"eval_{m.task.metric_label}": score}


def finish(bank: TrainableLoraBank, base: Any, members: list[Member], out_dir: Path, device: str,
           final_eval: bool = True) -> dict[str, TrainOutcome]:  # fmt: skip
    """Write every adapter in the served format; score base and adapters on each task's eval split (one engine
    run per task and evaluation setting: the base is decoded once, next to all of that task's adapters)."""
    outcomes: dict[str, TrainOutcome] = {}
    folders = {}
    for m in members:
        folder = bank.save(m.index, out_dir / m.spec.adapter_name, base.name, base.fingerprint, base.path)
        m.task.prompt_format().write(folder)
        folders[m.spec.adapter_name] = folder
        seconds = m.finished_seconds or 0.0
        t = m.spec.training
        outcomes[m.spec.adapter_name] = TrainOutcome(
            folder, m.step, m.last_loss, m.seen_tokens / max(seconds, 1e-9), seconds, peak_memory_mb(device),
            math.nan, math.nan,
            epochs=epochs_seen(m.step, t.micro_batch_size, t.grad_accum, 1, len(m.batches.units)),
            prompt_format=m.task.prompt_format().model_dump(),
        )  # fmt: skip
    by_eval: dict[str, list[Member]] = defaultdict(list)
    for m in members if final_eval else []:
        key = f"{m.spec.task}|{m.spec.task_config.model_dump_json()}|{m.spec.evaluation.model_dump_json()}"
        by_eval[key].append(m)
    base.model.eval()
    pad_id = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else base.tokenizer.eos_token_id
    dtype = next(p for p in base.model.parameters() if p.dtype.is_floating_point).dtype
    for group in by_eval.values():
        first = group[0]
        if not first.task.metric.generates:  # eval_loss: the base's loss and each adapter's
            base_loss = _eval_loss(bank, base.model, first, first.eval_rows, pad_id, dtype, device, adapter=False)
            for m in group:
                outcome = outcomes[m.spec.adapter_name]
                outcome.base_score = base_loss
                outcome.adapter_score = _eval_loss(bank, base.model, m, m.eval_rows, pad_id, dtype, device)
            continue
        adapters = {BASE: None, **{m.spec.adapter_name: folders[m.spec.adapter_name] for m in group}}
        with bank.disabled():
            results = evaluate(base, first.eval_rows, first.task.metric, adapters, first.spec.evaluation.max_new_tokens,
                               first.spec.evaluation.batch_size, max(m.spec.lora.r for m in group))  # fmt: skip
        for m in group:
            outcome, mine = outcomes[m.spec.adapter_name], results[m.spec.adapter_name]
            outcome.base_score, outcome.adapter_score = results[BASE].score, mine.score
            outcome.details = {**{f"base_{k}": v for k, v in results[BASE].details.items()},
                               **{f"adapter_{k}": v for k, v in mine.details.items()}}  # fmt: skip
            outcome.examples = [
                {"input": example_input(ex), "expected": ex.reference, "base": b, "adapter": a}
                for ex, b, a in zip(m.eval_rows[:5], results[BASE].predictions, mine.predictions, strict=False)
            ]  # fmt: skip
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    specs = load_config(args.config).trials()
    if args.max_steps:
        specs = [s.model_copy(update={"training": s.training.model_copy(update={"max_steps": args.max_steps})})
                 for s in specs]  # fmt: skip
    outcomes = cotrain(specs, PrintGroupHooks(), args.out)
    for name, o in outcomes.items():
        print(f"{name}: base {o.base_score:.1f} -> adapter {o.adapter_score:.1f} ({o.steps} steps, "
              f"{o.train_seconds:.0f}s, {o.tokens_per_s:.0f} tok/s)")  # fmt: skip


if __name__ == "__main__":
    main()
