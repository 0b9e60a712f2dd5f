"""An encoded example shown exactly as the model sees it, with the trained-on tokens marked.

Consecutive tokens with the same role (trained or not) are decoded together, special tokens included, so the text
is the chat template's own rendering. Trained runs are wrapped in ⟦ ⟧, or coloured green on a terminal.

    from jobs.task_data.render import marked_runs, format_runs
    print(format_runs(marked_runs(tokenizer, encoded)))     # "<|im_start|>user\n2+2?<|im_end|>\n...⟦4<|im_end|>\n⟧"
"""

from __future__ import annotations

from typing import Any

from jobs.data import IGNORE, Encoded

OPEN, CLOSE = "⟦", "⟧"
GREEN, RESET = "\x1b[32m", "\x1b[0m"


def marked_runs(tokenizer: Any, encoded: Encoded) -> list[tuple[str, bool]]:
    """(text, trained) runs of an encoded example, in order."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    decode = tokenizer.decode
    return [(decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), t) for ids, t in runs]


def format_runs(runs: list[tuple[str, bool]], color: bool = False) -> str:
    """The runs as one string: trained text in ⟦ ⟧ (or green when `color`)."""
    start, end = (GREEN, RESET) if color else (OPEN, CLOSE)
    return "".join(f"{start}{text}{end}" if trained else text for text, trained in runs)
