"""The end of a sweep: a summary table (task, adapter, metric, base score, adapter score, delta, epochs seen, train
time, tokens/s, registry version) printed with rich, and a LoRA-Land-style bar chart (base vs adapter per task)
saved as PNG. Used by jobs/sweep.py; `delta` is the adapter's improvement (for `eval_loss`: the loss it removed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in ("task", "adapter", "metric", "base", "adapter", "delta", "epochs", "train time", "tokens/s",
                 "registry"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("task", "adapter", "metric", "registry") else "right")
    for row in rows:
        delta = row["delta"]
        table.add_row(row["task"], row["adapter"], row["metric"], f"{row['base']:.1f}", f"{row['adapter_score']:.1f}",
                      f"[{'green' if delta >= 20 else 'yellow' if delta > 0 else 'red'}]{delta:+.1f}[/]",
                      f"{row.get('epochs', float('nan')):.2f}", f"{row['train_s']:.0f}s", f"{row['tokens_per_s']:.0f}", row.get("version") or "-")  # fmt: skip
    Console(width=140).print(table)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["task"] not in best or row["delta"] > best[row["task"]]["delta"]:  # delta: higher is better for all
            best[row["task"]] = row
    tasks = sorted(best)
    x = range(len(tasks))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks)), 4))
    ax.bar([i - 0.2 for i in x], [best[t]["base"] for t in tasks], 0.4, label="base model", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], [best[t]["adapter_score"] for t in tasks], 0.4, label="LoRA adapter", color="#2f80ed")
    for i, t in enumerate(tasks):
        ax.text(i + 0.2, best[t]["adapter_score"] + 1, f"{best[t]['adapter_score']:.0f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), [f"{t}\n({best[t]['metric']})" for t in tasks], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("eval score (0-100)")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
