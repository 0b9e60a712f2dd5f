"""Early stopping on the quick evals' eval loss, per adapter (solo runs and each co-trained adapter alike).

An adapter stops after `patience` quick evals in a row without a lower eval loss than its best so far; its final
adapter is the weights at that point. The state is two numbers, saved in checkpoints so a resumed run agrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EarlyStop:
    patience: int | None
    best: float = math.inf
    evals_without_gain: int = 0

    def update(self, eval_loss: float) -> bool:
        """Record one quick eval; True when the adapter should stop now."""
        if eval_loss < self.best:
            self.best, self.evals_without_gain = eval_loss, 0
        else:
            self.evals_without_gain += 1
        return self.patience is not None and self.evals_without_gain >= self.patience

    def state(self) -> dict[str, float]:
        return {"best_eval_loss": self.best, "evals_without_gain": self.evals_without_gain}

    def restore(self, state: dict[str, float]) -> None:
        self.best = float(state.get("best_eval_loss", math.inf))
        self.evals_without_gain = int(state.get("evals_without_gain", 0))
