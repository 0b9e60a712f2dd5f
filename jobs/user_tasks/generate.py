"""Two tasks of the kind users bring, which the project never tuned for: they prove the "your own data" path end to
end (README "Your own task") and measured the default training length for user tasks (jobs/training_length.py).

- `ticket_triage` (classification, prompt/completion JSONL, metric choice): a support ticket -> the team that
  owns it (billing, technical, account, shipping, sales). Raw-completion rows: {"prompt": "Ticket: ...\\nTeam:",
  "completion": " billing"}.
- `meeting_extract` (JSON extraction, chat `messages` JSONL, metric json_fields): a scheduling message -> {"person",
  "day", "time" (24h HH:MM), "minutes" (int)}. Each row is a conversation with its own system turn.

Deterministic (seeded); writes `<out>/<task>/{train,eval}.jsonl`, eval inputs unseen in train.

    python -m jobs.user_tasks.generate --out jobs/user_tasks/data           # what is committed
    python -m jobs.user_tasks.generate --out /tmp/mine --check              # exit 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

SIZES = {"train": 240, "eval": 100}

TEAMS = {
    "billing": ("I was charged twice for {thing}", "my invoice for {thing} shows the wrong amount",
                "please refund the {thing} payment", "why did my card get billed for {thing}",
                "the {thing} subscription price went up without notice"),
    "technical": ("the {thing} app crashes when I open it", "I get error 500 when I use {thing}",
                  "{thing} stopped syncing since the last update", "the {thing} page will not load",
                  "uploading files to {thing} times out"),
    "account": ("I cannot log in to my {thing} account", "please reset the password for {thing}",
                "how do I change the email on my {thing} profile", "my {thing} account got locked",
                "I want to delete my {thing} account"),
    "shipping": ("my {thing} order has not arrived", "the {thing} parcel tracking has not moved for a week",
                 "the {thing} box arrived damaged", "can I change the delivery address for {thing}",
                 "the courier lost my {thing} package"),
    "sales": ("do you offer a discount on {thing} for teams", "I would like a quote for 50 {thing} licences",
              "can I get a demo of {thing}", "what does the enterprise plan of {thing} include",
              "we want to buy {thing} for our school"),
}  # fmt: skip
THINGS = ("Photon Cloud", "Nimbus Drive", "TeamBoard", "PixelPad", "Orbit Mail", "Quill Notes", "Beacon CRM",
          "Atlas Maps", "Echo Chat", "Lumen TV")  # fmt: skip
OPENERS = ("", "Hi, ", "Hello team, ", "Urgent: ", "Good morning. ", "Hey, ")
CLOSERS = ("", " Thanks.", " Please help.", " Regards, Kim", " Any update?", " Cheers")

PEOPLE = ("Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ines", "Jon", "Kai", "Lena", "Milo", "Noor")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
MEETING_SYSTEM = ('Extract the meeting request as JSON with keys "person", "day", "time" (24-hour HH:MM) and '
                  '"minutes" (integer). Output only the JSON object.')  # fmt: skip
MEETING_TEMPLATES = (
    "Can we meet with {p} on {d} at {t} for {m}?", "{p} wants a {m} call on {d}, {t}.",
    "Please book {m} with {p} {d} at {t}.", "Set up a meeting: {p}, {d}, {t}, {m}.",
    "Are you free on {d} at {t}? {p} needs {m}.", "Schedule {p} for {d} {t} ({m}).",
)  # fmt: skip


def ticket_row(rng: random.Random) -> dict:
    team = rng.choice(sorted(TEAMS))
    body = rng.choice(TEAMS[team]).format(thing=rng.choice(THINGS))
    text = rng.choice(OPENERS) + body[0].upper() + body[1:] + "." + rng.choice(CLOSERS)
    return {"prompt": f"Ticket: {text}\nTeam:", "completion": f" {team}"}


def _clock(rng: random.Random) -> tuple[str, str]:
    hour, minute = rng.randint(8, 17), rng.choice((0, 15, 30, 45))
    said = (f"{hour % 12 or 12}:{minute:02d} {'am' if hour < 12 else 'pm'}" if rng.random() < 0.5
            else f"{hour % 12 or 12}{'' if minute == 0 else f':{minute:02d}'}{'am' if hour < 12 else 'pm'}"
            if rng.random() < 0.5 else f"{hour:02d}:{minute:02d}")  # fmt: skip
    return said, f"{hour:02d}:{minute:02d}"


def meeting_row(rng: random.Random) -> dict:
    person, day = rng.choice(PEOPLE), rng.choice(DAYS)
    said, clock = _clock(rng)
    minutes = rng.choice((15, 20, 30, 45, 60, 90))
    spoken = rng.choice((f"{minutes} minutes", f"{minutes} min", "an hour" if minutes == 60 else f"{minutes} minutes",
                         "half an hour" if minutes == 30 else f"{minutes} mins"))  # fmt: skip
    text = rng.choice(MEETING_TEMPLATES).format(p=person, d=day, t=said, m=spoken)
    answer = json.dumps({"person": person, "day": day, "time": clock, "minutes": minutes})
    return {"messages": [{"role": "system", "content": MEETING_SYSTEM}, {"role": "user", "content": text},
                         {"role": "assistant", "content": answer}]}  # fmt: skip


TASKS: dict[str, Callable[[random.Random], dict]] = {"ticket_triage": ticket_row, "meeting_extract": meeting_row}


def _key(row: dict) -> str:
    return row["prompt"] if "prompt" in row else row["messages"][1]["content"]


def build(task: str, seed: int = 1234) -> dict[str, list[dict]]:
    """Distinct rows for train, then eval rows whose inputs are not in train."""
    rng, make = random.Random(f"{task}-{seed}"), TASKS[task]
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    seen: set[str] = set()
    for split, size in SIZES.items():
        for _ in range(size * 200):
            if len(splits[split]) == size:
                break
            row = make(rng)
            if _key(row) not in seen:
                seen.add(_key(row))
                splits[split].append(row)
        if len(splits[split]) < size:
            raise RuntimeError(f"{task}: only {len(splits[split])} distinct {split} rows")
    return splits


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args()
    differ = []
    for task in TASKS:
        for split, rows in build(task).items():
            path = args.out / task / f"{split}.jsonl"
            if args.check:
                if not path.is_file() or path.read_text(encoding="utf-8") != render(rows):
                    differ.append(str(path))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(rows), encoding="utf-8")
            print(f"wrote {path} ({len(rows)} rows)")
    if differ:
        print("differs from a regeneration: " + ", ".join(differ), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
