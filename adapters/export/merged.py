"""Export format `merged`: the base with the adapter merged in (W + scaling * B @ A on every adapted projection),
as a Hugging Face safetensors folder with the tokenizer and chat template. Loads with `AutoModelForCausalLM`.

    lorafleet export sentiment --format merged --out exports/sentiment-merged
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapters.export.prepare import ExportSource, atomic_folder, merged_state_dict


def export_merged(source: ExportSource, out: Path) -> list[Path]:
    model = source.base.model
    model.load_state_dict(merged_state_dict(source), strict=True)
    model.config._name_or_path = f"{source.base.name}+{source.adapter_dir.name}"
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        source.base.tokenizer.save_pretrained(tmp)
        if source.prompt is not None:
            source.prompt.write(tmp)
    return sorted(out.iterdir())


def main() -> None:
    from adapters.export.prepare import load_source

    parser = argparse.ArgumentParser(description="Merge an adapter folder into its base, save as safetensors.")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for path in export_merged(load_source(args.adapter, args.base), args.out):
        print(path)


if __name__ == "__main__":
    main()
