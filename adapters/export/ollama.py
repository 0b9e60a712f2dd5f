"""The Ollama `Modelfile` written next to an exported GGUF: the file, the prompt template, the adapter's trained
system prompt and stop strings (from `lorafleet_prompt.json` when the adapter has one), greedy decoding.

Ollama templates are Go templates, not the Jinja chat template inside the GGUF, so only known formats are
translated: ChatML (`<|im_start|>`, SmolLM2 and the tiny test model) and plain completion. For any other chat
template no TEMPLATE is written and Ollama falls back to the template it detects from the GGUF metadata.

    python -m adapters.export.ollama exports/sentiment-q4/Modelfile     # print a written Modelfile
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from adapters.prompt_format import PROMPT_FILE, PromptFormat

CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
COMPLETION_TEMPLATE = "{{ .Prompt }}"


def _quoted(text: str) -> str:
    """A Modelfile value in triple quotes; a value holding triple quotes is written as a JSON string instead."""
    return json.dumps(text) if '"""' in text else f'"""{text}"""'


def _go_literal(text: str) -> str:
    """Text that a Go template prints as is (its `{{` would otherwise start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile_text(gguf_file: str, prompt: PromptFormat | None, tokenizer: Any) -> str:
    chat_template = getattr(tokenizer, "chat_template", None) or ""
    mode = prompt.mode if prompt else "chat"
    stops = list(prompt.stop) if prompt else []
    lines = [
        "# Written by `lorafleet export`. Create the model with: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_file}",
    ]
    if mode == "completion":
        prefix = _go_literal((prompt.prompt_prefix or "") if prompt else "")
        lines.append(f"TEMPLATE {_quoted(prefix + COMPLETION_TEMPLATE)}")
    elif "<|im_start|>" in chat_template:
        lines.append(f"TEMPLATE {_quoted(CHATML_TEMPLATE)}")
        stops.append("<|im_end|>")
    else:
        lines.append("# chat template not translated to Ollama's Go template: Ollama uses the one in the GGUF")
    if prompt is None:
        lines.append(f"# the adapter has no {PROMPT_FILE}: add the SYSTEM prompt it was trained with here")
    elif prompt.system_prompt:
        lines.append(f"SYSTEM {_quoted(prompt.system_prompt)}")
    lines.append("PARAMETER temperature 0")
    lines.extend(f"PARAMETER stop {json.dumps(stop)}" for stop in dict.fromkeys(stops))
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_file: str, prompt: PromptFormat | None, tokenizer: Any) -> None:
    path.write_text(modelfile_text(gguf_file, prompt, tokenizer))


def main() -> None:
    parser = argparse.ArgumentParser(description="Print a Modelfile written by `lorafleet export`.")
    parser.add_argument("modelfile", type=Path)
    print(parser.parse_args().modelfile.read_text(), end="")


if __name__ == "__main__":
    main()
