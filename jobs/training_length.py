"""How long each adapter trains when the sweep does not say: the bundled tasks keep their measured recipe (a fixed
step count), a user's task trains for a number of epochs chosen by measurement on tasks the project never tuned for
(README "Your own task"; `python -m jobs.user_tasks.generate` writes those tasks).

Also the arithmetic a user needs to reason about length: epochs seen for a given number of steps.

    python -m jobs.training_length --rows 750 --micro-batch 4 --steps 60      # -> 0.32 epochs
"""

from __future__ import annotations

import argparse
from typing import Any

# The bundled tasks' recipe: 60 steps x 4 rows is 0.4 epoch of their 600 rows and gives +61..+100 points on each
# (README "Results"); they are near-duplicates by construction, so little data goes a long way.
BUNDLED_TASK_STEPS = 60
# A user's task: measured on the two unseen tasks in jobs/user_tasks (bench/RESULTS.md "Your own tasks"): the JSON
# extraction task scored 92.5 after 0.5 epoch and 98.75 from 1 epoch on; both gained +93..+100 points in 2 epochs;
# a 750-row conversion task reported in issue 16 needed 2 epochs (2% after 0.3 epoch, 98% after 2).
USER_TASK_EPOCHS = 2.0


def default_length(bundled: bool) -> dict[str, Any]:
    """The training-length fields (max_steps / epochs) a trial gets when the sweep sets neither."""
    return (
        {"max_steps": BUNDLED_TASK_STEPS, "epochs": None}
        if bundled
        else {"max_steps": None, "epochs": USER_TASK_EPOCHS}
    )


def epochs_seen(steps: int, micro_batch: int, grad_accum: int, world: int, train_units: int) -> float:
    """Passes over the training split after `steps` optimizer steps (`train_units`: rows, or packed rows)."""
    return steps * micro_batch * grad_accum * world / max(train_units, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description="Epochs seen for a number of steps.")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    print(f"{epochs_seen(args.steps, args.micro_batch, args.grad_accum, args.workers, args.rows):.2f} epochs")


if __name__ == "__main__":
    main()
