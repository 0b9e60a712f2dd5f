"""Export format `peft`: the adapter as standard PEFT files (adapter_config.json + adapter_model.safetensors) plus
its prompt metadata (`lorafleet_prompt.json`) when it has one. Loadable with `peft.PeftModel.from_pretrained`.

The files are copied byte for byte after the adapter has been validated against its base (the same checks the
serving engine applies), so what is exported is exactly what the endpoint serves.

    lorafleet export sentiment --format peft --out exports/sentiment-peft
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from adapters.export.prepare import ExportSource, atomic_folder
from adapters.lora_files import CONFIG_FILE, WEIGHTS_FILE
from adapters.prompt_format import PROMPT_FILE


def export_peft(source: ExportSource, out: Path) -> list[Path]:
    files = [CONFIG_FILE, WEIGHTS_FILE] + ([PROMPT_FILE] if (source.adapter_dir / PROMPT_FILE).is_file() else [])
    with atomic_folder(out) as tmp:
        for file in files:
            shutil.copyfile(source.adapter_dir / file, tmp / file)
    return [out / file for file in files]


def main() -> None:
    from adapters.export.prepare import load_source

    parser = argparse.ArgumentParser(description="Copy a validated adapter folder as PEFT files.")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for path in export_peft(load_source(args.adapter, args.base), args.out):
        print(path)


if __name__ == "__main__":
    main()
