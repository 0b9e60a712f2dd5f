"""The prompt an adapter was trained with, stored next to its weights (`lorafleet_prompt.json`) so that serving
can ask it the same way: chat (the base's chat template, with the trained system prompt) or raw completion (an
optional text prefix), plus the stop text that ended its training targets.

Written by the training loops; read by the serving engine's replicas (`serve_app.prompting`) and by exports.

    python -m adapters.prompt_format <adapter_dir>          # print what an adapter was trained with
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROMPT_FILE = "lorafleet_prompt.json"
MAX_PROMPT_CHARS = 20_000  # a system prompt longer than this is not a prompt: refuse the file


class PromptFormatError(ValueError):
    """A prompt file that cannot be used; the message says why."""


class PromptFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["chat", "completion"] = Field(description="chat: the base's chat template; completion: raw text")
    system_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="chat: added when absent")
    prompt_prefix: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="completion: put before")
    stop: list[str] = Field([], description="text that ended every training target (besides end-of-sequence)")
    format: str = Field("input_output", description="the dataset format it was trained on")

    def write(self, folder: Path) -> Path:
        path = Path(folder) / PROMPT_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path


def read_prompt_format(folder: Path | str) -> PromptFormat | None:
    """The adapter's prompt format, or None for an adapter without one (trained elsewhere: served as asked)."""
    path = Path(folder) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        return PromptFormat.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError, ValidationError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else None
        reason = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(err).splitlines()[0]
        raise PromptFormatError(f"{PROMPT_FILE} is not valid ({reason})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", type=Path)
    args = parser.parse_args()
    found = read_prompt_format(args.adapter_dir)
    print(found.model_dump_json(indent=2) if found else f"{args.adapter_dir}: no {PROMPT_FILE} (served as asked)")


if __name__ == "__main__":
    main()
