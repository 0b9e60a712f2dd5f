"""Regenerate (or verify) every bundled task's train/eval JSONL files, deterministically.

Per task: one `random.Random(task_seed(name))` stream (seed = CRC32 of the name); the first 600 distinct rows
are train, then rows are drawn from the same stream until 100 eval rows whose inputs are not in train.
Rows are written as `json.dumps(row, ensure_ascii=False, sort_keys=True)`, one per line, trailing newline.

    python -m jobs.tasks.generate                 # write jobs/tasks/data/<task>/{train,eval}.jsonl
    python -m jobs.tasks.generate --check         # exit 1 if any committed file differs from a regeneration
    python -m jobs.tasks.generate --task sentiment
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from jobs.tasks import SPLIT_SIZES, TASKS, Task, data_dir, get_task

MAX_EVAL_DRAWS = 50  # batches of fresh draws before giving up on finding distinct eval inputs


def build_splits(task: Task) -> dict[str, list[dict]]:
    """Generate {"train": rows, "eval": rows} in memory; ids are "<task>-<split>-<index>"."""
    rng = random.Random(task.seed)
    train = task.make_rows(rng, SPLIT_SIZES["train"])
    taken = {row["input"] for row in train}
    held_out: list[dict] = []
    for _ in range(MAX_EVAL_DRAWS):
        missing = SPLIT_SIZES["eval"] - len(held_out)
        if missing == 0:
            break
        for row in task.make_rows(rng, missing):
            if row["input"] not in taken:
                taken.add(row["input"])
                held_out.append(row)
    if len(held_out) < SPLIT_SIZES["eval"]:
        raise RuntimeError(f"{task.name}: could not draw {SPLIT_SIZES['eval']} eval inputs unseen in train")
    return {
        split: [
            {"id": f"{task.name}-{split}-{i:04d}", "input": r["input"], "output": r["output"]}
            for i, r in enumerate(rows)
        ]
        for split, rows in (("train", train), ("eval", held_out))
    }


def render_jsonl(rows: list[dict]) -> bytes:
    """The exact bytes of a split file."""
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode("utf-8")


def task_files(task: Task, root: Path | None = None) -> dict[Path, bytes]:
    """Every file of one task (path -> bytes), as a regeneration would write it."""
    folder = (root or data_dir()) / task.name
    return {folder / f"{split}.jsonl": render_jsonl(rows) for split, rows in build_splits(task).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", action="append", help="only this task (repeatable); default: all")
    parser.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    parser.add_argument("--out", type=Path, default=None, help="root folder (default: jobs/tasks/data)")
    args = parser.parse_args(argv)
    tasks = [get_task(name) for name in args.task] if args.task else list(TASKS.values())
    stale: list[Path] = []
    for task in tasks:
        for path, data in task_files(task, args.out).items():
            if args.check:
                if not path.is_file() or path.read_bytes() != data:
                    stale.append(path)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            lines = data.count(b"\n")
            print(f"wrote {path} ({lines} rows, {len(data):,} bytes)")
    if stale:
        print("out of date (run `python -m jobs.tasks.generate`):\n  " + "\n  ".join(map(str, stale)), file=sys.stderr)
        return 1
    if args.check:
        print(f"{len(tasks)} task(s) up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
