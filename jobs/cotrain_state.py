"""The per-adapter bookkeeping of a co-training run (`Member`), and its checkpoints.

A `Member` is one co-trained adapter: its data order, optimizer, schedule, step and micro-batch position,
gradient-accumulation window, early stop and metric windows. A group checkpoint holds, per adapter, the same
files a solo checkpoint holds (adapter safetensors + adapter_config.json, `trainer_state.pt` with optimizer and
schedule) plus one `progress.json` for the group, so a killed co-training worker resumes every adapter where it
was (tests/test_cotrain.py checks resumed == uninterrupted).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jobs.config import TrialSpec
from jobs.data import Batches, Encoded
from jobs.early_stop import EarlyStop

PROGRESS_FILE = "progress.json"
STATE_FILE = "trainer_state.pt"


@dataclass
class Member:
    spec: TrialSpec
    index: int  # adapter k of the bank (slot k + 1)
    task: Any
    tokenizer: Any
    batches: Batches
    eval_rows: list[Any]  # jobs.task_data.Example rows scored at the end
    optimizer: Any
    stopper: EarlyStop
    scheduler: Any = None
    total_steps: int = 0
    step: int = 0
    micro_index: int = 0
    pending: int = 0  # micro-batches accumulated towards the next optimizer step
    window_targets: int = 0  # completion tokens in the current step's micro-batches (the loss normaliser)
    step_loss: float = 0.0
    step_targets: int = 0
    seen_tokens: int = 0
    last_loss: float = math.nan
    finished_seconds: float | None = None
    stop_reason: str = ""
    _log: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "count": 0, "tokens": 0, "since": 0.0})

    @classmethod
    def build(cls, spec: TrialSpec, index: int, task: Any, tokenizer: Any, examples: list[Encoded],
              eval_rows: list[Any], optimizer: Any) -> Member:  # fmt: skip
        t = spec.training
        batches = Batches(examples, t.micro_batch_size, t.max_seq_len, t.packing, t.seed)
        return cls(spec, index, task, tokenizer, batches, eval_rows, optimizer, EarlyStop(t.early_stop_patience))

    @property
    def slot(self) -> int:
        return self.index + 1

    @property
    def done(self) -> bool:
        return self.finished_seconds is not None

    def next_micro_batch(self) -> list[list[Encoded]]:
        """This adapter's next micro-batch, the one its solo run takes at the same point."""
        if self.pending == 0:
            window = [self.batches.at(self.micro_index + i) for i in range(self.spec.training.grad_accum)]
            self.window_targets = sum(lab != -100 for mb in window for row in mb for ex in row for lab in ex.labels)
        micro = self.batches.at(self.micro_index)
        self.micro_index += 1
        self.pending += 1
        return micro

    def record(self, loss_sum: float, targets: int, tokens: int) -> None:
        self.step_loss += loss_sum
        self.step_targets += targets
        self.seen_tokens += tokens
        self._log["tokens"] += tokens

    def finish_step(self, elapsed: float) -> dict[str, float] | None:
        """After this adapter's optimizer step: the metrics to log at this step, if it is a logging step."""
        self.step += 1
        self.pending = 0
        self.last_loss = self.step_loss / max(self.step_targets, 1)
        self.step_loss, self.step_targets = 0.0, 0
        self._log["loss"] += self.last_loss
        self._log["count"] += 1
        if self.step >= self.total_steps:
            self.finished_seconds, self.stop_reason = elapsed, "max_steps"
        if self.step % self.spec.training.log_every and self.step < self.total_steps:
            return None
        window = max(elapsed - self._log["since"], 1e-9)
        metrics = {"loss": self._log["loss"] / self._log["count"], "lr": self.scheduler.get_last_lr()[0],
                   "tokens_per_s": self._log["tokens"] / window,
                   "epoch": self.micro_index / max(self.batches.per_epoch, 1)}  # fmt: skip
        self._log = {"loss": 0.0, "count": 0, "tokens": 0, "since": elapsed}
        return metrics

    def stop_early(self, elapsed: float) -> None:
        self.finished_seconds, self.stop_reason = elapsed, "early_stop"

    def progress(self) -> dict[str, Any]:
        return {"step": self.step, "micro_index": self.micro_index, "seen_tokens": self.seen_tokens,
                "last_loss": self.last_loss, "finished_seconds": self.finished_seconds,
                "stop_reason": self.stop_reason, **self.stopper.state()}  # fmt: skip


def save_group_checkpoint(folder: Path, bank: Any, members: list[Member], round_index: int, base: Any) -> Path:
    """Every adapter's files and optimizer/schedule state, and the group's progress (call between steps)."""
    folder.mkdir(parents=True)
    for m in members:
        sub = bank.save(m.index, folder / m.spec.adapter_name, base.name, base.fingerprint, base.path)
        torch.save({"optimizer": m.optimizer.state_dict(), "scheduler": m.scheduler.state_dict()}, sub / STATE_FILE)
    record = {"round": round_index, "members": {m.spec.adapter_name: m.progress() for m in members}}
    (folder / PROGRESS_FILE).write_text(json.dumps(record))
    return folder


def load_group_checkpoint(folder: Path, bank: Any, members: list[Member]) -> int:
    """Restore every adapter found in the checkpoint (others start fresh); return the round to continue from."""
    record = json.loads((folder / PROGRESS_FILE).read_text())
    for m in members:
        saved = record["members"].get(m.spec.adapter_name)
        if saved is None:
            continue
        bank.load(m.index, folder / m.spec.adapter_name)
        state = torch.load(folder / m.spec.adapter_name / STATE_FILE, weights_only=True)
        m.optimizer.load_state_dict(state["optimizer"])
        m.scheduler.load_state_dict(state["scheduler"])
        m.step, m.micro_index, m.seen_tokens = saved["step"], saved["micro_index"], saved["seen_tokens"]
        m.last_loss, m.finished_seconds = saved["last_loss"], saved["finished_seconds"]
        m.stop_reason = saved["stop_reason"]
        m.stopper.restore(saved)
    return int(record["round"])
